"""Money in: top-ups through a payment provider (Stripe, or the local dummy), the provider's
webhooks, auto top-up, and balance alerts with their outbox. Postings go through the engine
(billing/services/); this package knows the providers and the events."""

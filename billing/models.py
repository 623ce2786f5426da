"""The money core's tables. Writes go through billing/services/, reads through selectors."""

from __future__ import annotations

from decimal import Decimal

from django.conf import settings
from django.db import models
from django.db.models import Q

from billing.money import MoneyField
from billing.pricing import Price


class Account(models.Model):
    class Kind(models.TextChoices):
        CUSTOMER = "customer"
        REVENUE = "revenue"  # usage income
        PROMOTIONS = "promotions"  # source of granted credit
        WRITE_OFFS = "write_offs"  # usage we could not collect
        PAYMENTS = "payments"  # source of purchased credit, sink of refunds

    class Status(models.TextChoices):
        ACTIVE = "active"
        SUSPENDED = "suspended"
        CLOSED = "closed"

    name = models.CharField(max_length=200)
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.CUSTOMER)
    currency = models.CharField(max_length=3, default="USD")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.ACTIVE)
    # Cached projection of the ledger, maintained for customer accounts only (system accounts
    # would be a hot row touched by every request). Audited nightly against the legs.
    balance = MoneyField(default=0)
    held = MoneyField(default=0)
    overdraft = MoneyField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    # Payments and alerts (billing/payments/). The engine reads the thresholds and `*_armed` in
    # the same UPDATE that moves the balance: one event (or auto top-up) per crossing below a
    # threshold, re-armed when the available balance is back at or above it.
    billing_email = models.EmailField(blank=True, default="")
    low_balance_threshold = MoneyField(null=True, blank=True)
    low_balance_armed = models.BooleanField(default=True)
    depleted_armed = models.BooleanField(default=True)  # re-armed by the next credit
    webhook_url = models.URLField(max_length=500, blank=True, default="")
    # `whsec_<base64>`: kept (not hashed) because we sign with it; shown once by set_alerts.
    webhook_secret = models.CharField(max_length=100, blank=True, default="")
    auto_topup_enabled = models.BooleanField(default=False)
    auto_topup_threshold = MoneyField(null=True, blank=True)
    auto_topup_amount = MoneyField(null=True, blank=True)
    auto_topup_monthly_limit = MoneyField(null=True, blank=True)
    auto_topup_armed = models.BooleanField(default=True)
    payment_customer_id = models.CharField(max_length=255, blank=True, default="")
    payment_method_id = models.CharField(max_length=255, blank=True, default="")

    class Meta:
        constraints = [
            models.CheckConstraint(condition=Q(held__gte=0), name="account_held_non_negative"),
            models.CheckConstraint(
                condition=Q(overdraft__gte=0), name="account_overdraft_non_negative"
            ),
            models.UniqueConstraint(
                fields=["kind"], condition=~Q(kind="customer"), name="one_account_per_system_kind"
            ),
        ]
        permissions = [
            ("post_adjustment", "Can post grants, purchases, refunds, adjustments"),
            # Adjustments are signed and unbounded: the admin also requires this one for them.
            ("post_balance_adjustment", "Can post balance adjustments"),
        ]

    def __str__(self) -> str:
        return f"{self.name} (#{self.pk})"

    @property
    def available(self) -> Decimal:
        return self.balance - self.held

    @property
    def is_system(self) -> bool:
        return self.kind != Account.Kind.CUSTOMER


class ApiKey(models.Model):
    class Purpose(models.TextChoices):
        REALTIME = "realtime"
        BATCH = "batch"
        PLAYGROUND = "playground"
        PLATFORM = "platform"

    class Status(models.TextChoices):
        ACTIVE = "active"
        REVOKED = "revoked"

    class BudgetPeriod(models.TextChoices):
        DAY = "day"
        WEEK = "week"
        MONTH = "month"

    class Scope(models.TextChoices):
        INFERENCE = "inference"  # completions and the /v1/billing/ reads
        ADMIN = "admin"  # all of that, plus the account's self-service endpoints

    account = models.ForeignKey(Account, on_delete=models.PROTECT, related_name="api_keys")
    name = models.CharField(max_length=200, blank=True)
    prefix = models.CharField(max_length=16, unique=True)
    # SHA-256 of the whole secret: the secret is 256 random bits, so a fast hash is safe and
    # cheap enough to check on every request.
    secret_hash = models.CharField(max_length=64, unique=True)
    purpose = models.CharField(max_length=16, choices=Purpose.choices, default=Purpose.REALTIME)
    completion_window = models.CharField(max_length=16, blank=True, default="")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.ACTIVE)
    created_at = models.DateTimeField(auto_now_add=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    budget_limit = MoneyField(null=True, blank=True)
    budget_period = models.CharField(
        max_length=8, choices=BudgetPeriod.choices, blank=True, default=""
    )
    # Spend settled in the period starting at budget_period_start; rolled over lazily.
    budget_period_start = models.DateTimeField(null=True, blank=True)
    budget_spent = MoneyField(default=0)
    # Active holds placed under the budget; survives period rollover.
    budget_held = MoneyField(default=0)
    scope = models.CharField(max_length=16, choices=Scope.choices, default=Scope.INFERENCE)
    # Rate limits (gateway/ratelimit.py): requests and billed tokens in any 60 s; null: none.
    rpm = models.PositiveIntegerField(null=True, blank=True)
    tpm = models.PositiveIntegerField(null=True, blank=True)

    class Meta:
        verbose_name = "API key"
        constraints = [
            models.CheckConstraint(
                condition=Q(budget_held__gte=0), name="apikey_budget_held_non_negative"
            ),
            models.CheckConstraint(
                condition=Q(budget_limit__isnull=True)
                | (Q(budget_limit__gte=0) & ~Q(budget_period="")),
                name="apikey_budget_has_period",
            ),
            models.CheckConstraint(
                condition=Q(rpm__isnull=True) | Q(rpm__gte=1), name="apikey_rpm_positive"
            ),
            models.CheckConstraint(
                condition=Q(tpm__isnull=True) | Q(tpm__gte=1), name="apikey_tpm_positive"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.name or 'unnamed'})"


class LanguageModel(models.Model):
    """A model alias clients may ask for; priced by tariffs, routed by the gateway."""

    alias = models.CharField(max_length=200, unique=True)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.alias


class TokenPrices(models.Model):
    """USD per million tokens by class: what a tariff charges and what a provider price costs
    us. Optional classes fall back to the input or output price (billing/pricing.py Price)."""

    input_per_mtok = MoneyField()
    output_per_mtok = MoneyField()
    cached_input_per_mtok = MoneyField(null=True, blank=True)
    cache_write_per_mtok = MoneyField(null=True, blank=True)
    reasoning_per_mtok = MoneyField(null=True, blank=True)

    PRICE_FIELDS = (
        "input_per_mtok",
        "output_per_mtok",
        "cached_input_per_mtok",
        "cache_write_per_mtok",
        "reasoning_per_mtok",
    )

    class Meta:
        abstract = True

    @property
    def price(self) -> Price:
        return Price(
            input_per_mtok=self.input_per_mtok,
            output_per_mtok=self.output_per_mtok,
            cached_input_per_mtok=self.cached_input_per_mtok,
            cache_write_per_mtok=self.cache_write_per_mtok,
            reasoning_per_mtok=self.reasoning_per_mtok,
        )


def _prices_non_negative(name: str) -> models.CheckConstraint:
    return models.CheckConstraint(
        condition=Q(input_per_mtok__gte=0)
        & Q(output_per_mtok__gte=0)
        & (Q(cached_input_per_mtok__isnull=True) | Q(cached_input_per_mtok__gte=0))
        & (Q(cache_write_per_mtok__isnull=True) | Q(cache_write_per_mtok__gte=0))
        & (Q(reasoning_per_mtok__isnull=True) | Q(reasoning_per_mtok__gte=0)),
        name=name,
    )


def _validity_ordered(name: str) -> models.CheckConstraint:
    return models.CheckConstraint(
        condition=Q(valid_until__isnull=True) | Q(valid_until__gt=models.F("valid_from")),
        name=name,
    )


class Tariff(TokenPrices):
    """What a customer pays. With `account` set, a negotiated price for that account alone: it
    wins over the general tariffs for that account's keys (billing/pricing.py tariff_choose)."""

    model = models.ForeignKey(LanguageModel, on_delete=models.PROTECT, related_name="tariffs")
    account = models.ForeignKey(
        Account, null=True, blank=True, on_delete=models.PROTECT, related_name="tariffs",
        limit_choices_to={"kind": "customer"},
        help_text="Only for this customer (a negotiated price); empty: everyone's.",
    )
    purpose = models.CharField(
        max_length=16, choices=ApiKey.Purpose.choices, default=ApiKey.Purpose.REALTIME
    )
    completion_window = models.CharField(max_length=16, blank=True, default="")
    valid_from = models.DateTimeField()
    valid_until = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        indexes = [models.Index(fields=["model", "purpose", "completion_window", "valid_from"])]
        constraints = [
            _prices_non_negative("tariff_prices_non_negative"),
            _validity_ordered("tariff_validity_ordered"),
        ]

    def __str__(self) -> str:
        window = f"/{self.completion_window}" if self.completion_window else ""
        who = f" for account {self.account_id}" if self.account_id else ""
        return f"{self.model_id}:{self.purpose}{window}{who} from {self.valid_from:%Y-%m-%d}"


class ProviderPrice(TokenPrices):
    """What a model costs us upstream, versioned by validity time like tariffs. Only reviewed
    prices are rows here: an import proposes (ProviderPriceProposal), finance accepts."""

    model = models.ForeignKey(
        LanguageModel, on_delete=models.PROTECT, related_name="provider_prices"
    )
    provider = models.CharField(max_length=64, blank=True, default="")
    source = models.CharField(max_length=100, blank=True, default="")  # manual, genai-prices x.y
    valid_from = models.DateTimeField()
    valid_until = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        indexes = [models.Index(fields=["model", "valid_from"])]
        constraints = [
            _prices_non_negative("provider_price_non_negative"),
            _validity_ordered("provider_price_validity_ordered"),
        ]

    def __str__(self) -> str:
        return f"{self.model_id} upstream price from {self.valid_from:%Y-%m-%d}"


class ProviderPriceProposal(TokenPrices):
    """A provider price an import found, waiting for finance's review: nothing is priced by it
    until it is accepted (which creates the ProviderPrice)."""

    class Status(models.TextChoices):
        PENDING = "pending"
        ACCEPTED = "accepted"
        REJECTED = "rejected"
        SUPERSEDED = "superseded"  # a later import proposed another price first

    model = models.ForeignKey(LanguageModel, on_delete=models.PROTECT, related_name="+")
    provider = models.CharField(max_length=64)
    catalogue_model = models.CharField(max_length=200)  # the catalogue's id for the model
    source = models.CharField(max_length=100)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    created_at = models.DateTimeField()
    decided_at = models.DateTimeField(null=True, blank=True)
    decided_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT,
        related_name="+",
    )
    accepted_price = models.OneToOneField(
        ProviderPrice, null=True, blank=True, on_delete=models.PROTECT, related_name="proposal"
    )

    class Meta:
        indexes = [models.Index(fields=["status", "model"])]
        constraints = [_prices_non_negative("provider_proposal_non_negative")]
        permissions = [("decide_providerpriceproposal", "Can accept or reject provider prices")]

    def __str__(self) -> str:
        return f"{self.model_id} upstream price proposal #{self.pk} ({self.status})"


class LedgerTransaction(models.Model):
    """An immutable posting. Its legs sum to zero (checked by Python and, on PostgreSQL, by a
    deferred constraint trigger at commit)."""

    class Kind(models.TextChoices):
        PURCHASE = "purchase"
        GRANT = "grant"
        USAGE = "usage"
        REFUND = "refund"
        ADJUSTMENT = "adjustment"
        WRITE_OFF = "write_off"
        REVERSAL = "reversal"

    kind = models.CharField(max_length=16, choices=Kind.choices)
    idempotency_key = models.CharField(max_length=200)  # unique: see Meta
    # SHA-256 of the posting's content: a replay with the same key must match it.
    content_hash = models.CharField(max_length=64)
    request_id = models.CharField(max_length=64, blank=True, default="")
    memo = models.TextField(blank=True, default="")
    # None means the system posted it (every gateway posting): indexed only where set.
    posted_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        db_index=False,
    )
    occurred_at = models.DateTimeField()
    posted_at = models.DateTimeField(db_index=True)
    reverses = models.OneToOneField(
        "self", null=True, blank=True, on_delete=models.PROTECT, related_name="reversed_by"
    )
    model_alias = models.CharField(max_length=200, blank=True, default="")
    is_overrun = models.BooleanField(default=False)
    is_late = models.BooleanField(default=False)

    class Meta:
        # Declared here rather than with unique=True / db_index=True, which on PostgreSQL also
        # add LIKE-only indexes that every posting would maintain for nothing.
        constraints = [
            models.UniqueConstraint(fields=["idempotency_key"], name="txn_idempotency_key_unique")
        ]
        indexes = [
            models.Index(fields=["kind", "posted_at"]),
            models.Index(fields=["request_id"], name="txn_request_id"),
            models.Index(
                fields=["posted_by"], condition=Q(posted_by__isnull=False), name="txn_posted_by"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.kind} #{self.pk} ({self.idempotency_key})"


class LedgerLeg(models.Model):
    """One side of a posting. Positive credits the account's balance, negative debits it."""

    transaction = models.ForeignKey(
        LedgerTransaction, on_delete=models.PROTECT, related_name="legs"
    )
    # Indexed by Meta's (account, transaction), which also serves lookups by account alone.
    account = models.ForeignKey(
        Account, on_delete=models.PROTECT, related_name="legs", db_index=False
    )
    amount = MoneyField()

    class Meta:
        constraints = [models.CheckConstraint(condition=~Q(amount=0), name="leg_amount_non_zero")]
        indexes = [models.Index(fields=["account", "transaction"])]

    def __str__(self) -> str:
        return f"{self.amount} on account {self.account_id} (transaction {self.transaction_id})"


class Hold(models.Model):
    """A two-phase reservation of a request's worst-case cost. Ends exactly once."""

    class State(models.TextChoices):
        ACTIVE = "active"
        SETTLED = "settled"
        RELEASED = "released"
        EXPIRED = "expired"

    # Unique through Meta (a UniqueConstraint): unique=True would add a second, LIKE-only index
    # on PostgreSQL that every insert and expiry would have to maintain.
    request_id = models.CharField(max_length=64)
    # Indexed by Meta's (account, state); every expiry rewrites each index of this table.
    account = models.ForeignKey(
        Account, on_delete=models.PROTECT, related_name="holds", db_index=False
    )
    api_key = models.ForeignKey(
        ApiKey, null=True, blank=True, on_delete=models.PROTECT, related_name="holds"
    )
    model_alias = models.CharField(max_length=200, blank=True, default="")
    amount = MoneyField()
    # Whether this hold was counted in api_key.budget_held (the budget may be set later).
    budgeted = models.BooleanField(default=False)
    state = models.CharField(max_length=10, choices=State.choices, default=State.ACTIVE)
    created_at = models.DateTimeField()
    expires_at = models.DateTimeField()
    resolved_at = models.DateTimeField(null=True, blank=True)
    settled_amount = MoneyField(null=True, blank=True)
    is_overrun = models.BooleanField(default=False)
    is_late = models.BooleanField(default=False)
    # The usage relayed so far, checkpointed by the gateway during a stream: if the gateway dies
    # before settling, the sweep charges this (flagged late; the usage record estimated) when
    # the hold expires, instead of leaving nothing to charge.
    checkpoint_cost = MoneyField(null=True, blank=True)
    checkpoint_usage = models.JSONField(null=True, blank=True)
    checkpoint_at = models.DateTimeField(null=True, blank=True)
    # The request's one posting (usage, or a finance charge or write-off), once there is one.
    transaction = models.OneToOneField(
        LedgerTransaction, null=True, blank=True, on_delete=models.PROTECT, related_name="hold"
    )

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["request_id"], name="hold_request_id_unique"),
            models.CheckConstraint(condition=Q(amount__gt=0), name="hold_amount_positive"),
            models.CheckConstraint(
                condition=Q(state__in=["active", "settled", "released", "expired"]),
                name="hold_state_valid",
            ),
            models.CheckConstraint(
                condition=Q(state="active", resolved_at__isnull=True)
                | (~Q(state="active") & Q(resolved_at__isnull=False)),
                name="hold_resolved_iff_not_active",
            ),
        ]
        indexes = [
            models.Index(
                fields=["expires_at"], condition=Q(state="active"), name="hold_active_expiry"
            ),
            models.Index(fields=["account", "state"]),
        ]

    def __str__(self) -> str:
        return f"hold {self.request_id} ({self.state})"


class UsageRecord(models.Model):
    """What one gateway request used and cost; written when its hold resolves."""

    class Status(models.TextChoices):
        SETTLED = "settled"
        RELEASED = "released"
        PENDING = "pending"  # settle handed to the retry path

    request_id = models.CharField(max_length=64)  # unique: see Meta
    # Indexed by Meta's (account, started_at), which also serves lookups by account alone.
    account = models.ForeignKey(
        Account, on_delete=models.PROTECT, related_name="usage_records", db_index=False
    )
    api_key = models.ForeignKey(
        ApiKey, null=True, blank=True, on_delete=models.PROTECT, related_name="usage_records"
    )
    model_alias = models.CharField(max_length=200)
    endpoint = models.CharField(max_length=64)
    stream = models.BooleanField(default=False)
    input_tokens = models.PositiveIntegerField(default=0)
    cached_input_tokens = models.PositiveIntegerField(default=0)
    cache_write_tokens = models.PositiveIntegerField(default=0)
    output_tokens = models.PositiveIntegerField(default=0)
    reasoning_tokens = models.PositiveIntegerField(default=0)
    estimated = models.BooleanField(default=False)
    cost = MoneyField(default=0)
    # What the request cost us upstream (its provider price at the hold's time), set once at
    # settle; null when the model had no provider price. Ours: never shown to the customer.
    provider_cost = MoneyField(null=True, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices)
    outcome = models.CharField(max_length=32, blank=True, default="")
    started_at = models.DateTimeField()
    first_byte_ms = models.PositiveIntegerField(null=True, blank=True)
    duration_ms = models.PositiveIntegerField(null=True, blank=True)
    created_at = models.DateTimeField()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["request_id"], name="usage_request_id_unique")
        ]
        indexes = [models.Index(fields=["account", "started_at"])]

    def __str__(self) -> str:
        return f"usage {self.request_id}"


class Statement(models.Model):
    """An account's issued monthly statement: its figures as issued and the PDF sent. Never
    changed once issued: a correction is a posting, and shows in the next month's."""

    account = models.ForeignKey(Account, on_delete=models.PROTECT, related_name="statements")
    month = models.DateField()  # the first day of the UTC calendar month
    issued_at = models.DateTimeField()
    figures = models.JSONField()  # billing.statements.StatementFigures.as_json()
    pdf = models.BinaryField()

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["account", "month"], name="one_statement_per_month")
        ]

    def __str__(self) -> str:
        return f"statement {self.month:%Y-%m} of account {self.account_id}"


# System accounts have fixed, negative ids: sequences only hand out positive ones, so they can
# never collide with a customer, and code needs no lookup (or cache) to find them.
SYSTEM_ACCOUNT_IDS: dict[str, int] = {
    Account.Kind.REVENUE: -1,
    Account.Kind.PROMOTIONS: -2,
    Account.Kind.WRITE_OFFS: -3,
    Account.Kind.PAYMENTS: -4,
}


# --- Payments and alerts (billing/payments/) ----------------------------------------------------


class PaymentEvent(models.Model):
    """A provider's webhook event, stored (unique by its id) before it is acted on."""

    class Status(models.TextChoices):
        RECEIVED = "received"
        APPLIED = "applied"
        IGNORED = "ignored"
        FAILED = "failed"

    provider = models.CharField(max_length=16)
    event_id = models.CharField(max_length=255)
    type = models.CharField(max_length=100)
    payload = models.JSONField()
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.RECEIVED)
    detail = models.TextField(blank=True, default="")
    account = models.ForeignKey(
        Account, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    # The provider's payment the event concerns: an event that arrives before the payment it
    # refers to waits (failed) and is applied again when that payment is credited.
    payment_intent_id = models.CharField(max_length=255, blank=True, default="")
    # The ledger transactions this event caused (purchases, refunds, disputes, reversals).
    transaction_ids = models.JSONField(default=list, blank=True)
    received_at = models.DateTimeField()
    applied_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["provider", "event_id"], name="payment_event_unique")
        ]
        indexes = [
            models.Index(fields=["received_at"]),
            models.Index(fields=["payment_intent_id"], condition=Q(status="failed"),
                         name="payment_event_waiting"),
        ]

    def __str__(self) -> str:
        return f"{self.type} {self.event_id} ({self.status})"


class Checkout(models.Model):
    """A top-up checkout session: created by the account (API) or finance (admin)."""

    class Status(models.TextChoices):
        OPEN = "open"
        COMPLETED = "completed"

    provider = models.CharField(max_length=16)
    session_id = models.CharField(max_length=255)
    account = models.ForeignKey(Account, on_delete=models.PROTECT, related_name="checkouts")
    amount = MoneyField()
    url = models.URLField(max_length=2000)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.OPEN)
    payment_intent_id = models.CharField(max_length=255, blank=True, default="")
    transaction = models.ForeignKey(
        LedgerTransaction, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    created_at = models.DateTimeField()
    completed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["provider", "session_id"], name="checkout_unique"),
            models.CheckConstraint(condition=Q(amount__gt=0), name="checkout_amount_positive"),
        ]

    def __str__(self) -> str:
        return f"checkout {self.session_id} ({self.status})"


class AutoTopupAttempt(models.Model):
    """One per crossing below the auto top-up threshold (written by the engine with the
    posting that crossed it); charged off-session by a Celery task, at most once."""

    class Status(models.TextChoices):
        PENDING = "pending"  # written by the engine, not yet picked up
        CHARGING = "charging"  # counted against the monthly limit; intent being created
        CONFIRMED = "confirmed"  # the intent succeeded; credit comes with its webhook
        SUCCEEDED = "succeeded"  # credited
        FAILED = "failed"
        SKIPPED = "skipped"  # over the monthly limit, disabled, or no saved payment method

    account = models.ForeignKey(Account, on_delete=models.PROTECT, related_name="auto_topups")
    amount = MoneyField()
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    payment_intent_id = models.CharField(max_length=255, blank=True, default="")
    failure_reason = models.TextField(blank=True, default="")
    transaction = models.ForeignKey(
        LedgerTransaction, null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    created_at = models.DateTimeField()
    updated_at = models.DateTimeField()

    class Meta:
        permissions = [("set_auto_topup", "Can set an account's auto top-up")]
        indexes = [
            models.Index(fields=["account", "created_at"]),
            models.Index(fields=["created_at"], condition=Q(status="pending"),
                         name="auto_topup_pending"),
        ]

    def __str__(self) -> str:
        return f"auto top-up #{self.pk} of account {self.account_id} ({self.status})"


class Notification(models.Model):
    """The outbox: an event for the account (balance.low, payment.succeeded, ...), written in
    the same transaction as what caused it; the relay task fans it out into deliveries."""

    account = models.ForeignKey(Account, on_delete=models.PROTECT, related_name="notifications")
    type = models.CharField(max_length=64)
    payload = models.JSONField()
    created_at = models.DateTimeField()
    dispatched_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        permissions = [("set_alerts", "Can set an account's balance alerts")]
        indexes = [
            models.Index(fields=["account", "created_at"]),
            models.Index(fields=["created_at"], condition=Q(dispatched_at__isnull=True),
                         name="notification_undispatched"),
        ]

    def __str__(self) -> str:
        return f"{self.type} #{self.pk} for account {self.account_id}"

    @property
    def message_id(self) -> str:
        """The Standard Webhooks `webhook-id`: the same on every retry, so receivers dedupe."""
        return f"msg_{self.pk}"


class NotificationDelivery(models.Model):
    class Channel(models.TextChoices):
        WEBHOOK = "webhook"
        EMAIL = "email"

    class Status(models.TextChoices):
        PENDING = "pending"
        DELIVERED = "delivered"
        FAILED = "failed"  # attempts exhausted

    notification = models.ForeignKey(
        Notification, on_delete=models.PROTECT, related_name="deliveries"
    )
    channel = models.CharField(max_length=16, choices=Channel.choices)
    target = models.CharField(max_length=500)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField()
    delivered_at = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True, default="")

    class Meta:
        verbose_name_plural = "notification deliveries"
        constraints = [
            models.UniqueConstraint(
                fields=["notification", "channel"], name="one_delivery_per_channel"
            )
        ]
        indexes = [
            models.Index(fields=["next_attempt_at"], condition=Q(status="pending"),
                         name="delivery_pending"),
        ]

    def __str__(self) -> str:
        return f"{self.channel} delivery of notification {self.notification_id} ({self.status})"


class DeliveryAttempt(models.Model):
    delivery = models.ForeignKey(
        NotificationDelivery, on_delete=models.PROTECT, related_name="attempt_log"
    )
    attempted_at = models.DateTimeField()
    ok = models.BooleanField()
    status_code = models.PositiveIntegerField(null=True, blank=True)
    error = models.TextField(blank=True, default="")

    def __str__(self) -> str:
        return f"attempt on delivery {self.delivery_id} ({'ok' if self.ok else 'failed'})"

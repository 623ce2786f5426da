from __future__ import annotations

import uuid
from typing import Any

from django.core.management.base import CommandError, CommandParser
from django.utils import timezone

from billing.management.base import BillingCommand, check_balance_after, parse_amount
from billing.models import Account, LedgerTransaction
from billing.money import money_str
from billing.selectors import account_balance_get
from billing.services.accounts import credit_post

KINDS = (LedgerTransaction.Kind.GRANT, LedgerTransaction.Kind.PURCHASE)


class Command(BillingCommand):
    help = (
        "Credit a customer account: a grant (promotional, the default) or a purchase (paid). "
        "Pass --idempotency-key to make a retried invocation post only once."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        super().add_arguments(parser)
        parser.add_argument("account_id", type=int)
        parser.add_argument("amount", help="USD, positive")
        parser.add_argument("--memo", required=True, help="why (kept on the ledger)")
        parser.add_argument(
            "--kind", default=LedgerTransaction.Kind.GRANT, help="grant or purchase"
        )
        parser.add_argument("--idempotency-key", help="default: a fresh key per invocation")

    def run(self, **options: Any) -> dict[str, Any]:
        if options["kind"] not in KINDS:
            raise CommandError(f"invalid --kind {options['kind']!r}: choose grant or purchase")
        amount = parse_amount(options["amount"])
        if amount == 0:
            raise CommandError("invalid amount: must be positive")
        balance = (
            Account.objects.filter(pk=options["account_id"], kind=Account.Kind.CUSTOMER)
            .values_list("balance", flat=True)
            .first()
        )
        if balance is not None:  # no such customer: the service says so
            check_balance_after(balance, amount)
        key = options["idempotency_key"] or f"grant_credits:{uuid.uuid4()}"
        posted = credit_post(
            kind=options["kind"],
            account_id=options["account_id"],
            amount=amount,
            memo=options["memo"],
            idempotency_key=key,
            now=timezone.now(),
        )
        balance = account_balance_get(account_id=options["account_id"]).as_json()
        return {
            "transaction_id": posted.transaction_id,
            "account_id": options["account_id"],
            "kind": options["kind"],
            "amount": money_str(amount),
            "idempotency_key": key,
            "replayed": posted.replayed,
            "balance": balance["balance"],
            "available": balance["available"],
        }

    def describe(self, result: dict[str, Any]) -> str:
        verb = "Already posted" if result["replayed"] else "Posted"
        return (
            f"{verb} {result['kind']} of {result['amount']} USD as transaction "
            f"{result['transaction_id']}; account {result['account_id']} balance "
            f"{result['balance']} USD"
        )

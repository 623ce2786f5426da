"""What every billing operator command shares: `--json`, one-line errors, argument parsing.

The commands are a contract scripts rely on: with `--json` stdout carries exactly one JSON
object on one line; anything else (logs, errors) goes to stderr, and a bad argument is one
line on stderr with a non-zero exit, never a traceback.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, NoReturn

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DataError

from billing.errors import BillingError
from billing.money import MoneyError, balance_after, money_parse


class OneLineParser(CommandParser):
    """argparse prints the usage block before an error; operators' scripts get one line."""

    def error(self, message: str) -> NoReturn:
        if self.called_from_command_line:
            self.exit(2, f"{self.prog}: error: {message}\n")
        raise CommandError(f"Error: {message}")


def parse_amount(raw: str, *, what: str = "amount") -> Decimal:
    """A non-negative exact USD amount; refuses negatives before any service sees them."""
    try:
        amount = money_parse(raw)
    except MoneyError as exc:
        raise CommandError(f"invalid {what}: {exc}") from exc
    if amount < 0:
        raise CommandError(f"invalid {what}: {raw!r} is negative")
    return amount


def parse_when(raw: str, *, what: str) -> datetime:
    """An ISO 8601 instant, in UTC (the platform's only zone; a naive one is taken as UTC).
    One outside years 1 to 9999 once in UTC is refused: PostgreSQL would store it, and
    then no read of its row (the key, the tariff) could load it."""
    try:
        when = datetime.fromisoformat(raw.strip())
    except ValueError as exc:
        raise CommandError(f"invalid {what}: {raw!r} is not an ISO 8601 date/time") from exc
    if when.tzinfo is None:
        return when.replace(tzinfo=UTC)
    try:
        return when.astimezone(UTC)
    except OverflowError as exc:
        raise CommandError(
            f"invalid {what}: {raw!r} is out of range (in UTC it falls outside years 1 to 9999)"
        ) from exc


def check_balance_after(balance: Decimal, amount: Decimal) -> None:
    """Refuse an amount that fits but would push the balance beyond what the database holds."""
    try:
        balance_after(balance, amount)
    except MoneyError as exc:
        raise CommandError(f"invalid amount: {exc}") from exc


def one_line(message: object) -> str:
    return " ".join(str(message).split())


class BillingCommand(BaseCommand):
    """Subclasses implement `run(**options) -> dict` and `describe(result) -> str`."""

    # System-check warnings would add lines to stderr; these commands touch only billing.
    requires_system_checks: list[str] = []

    def create_parser(self, prog_name: str, subcommand: str, **kwargs: Any) -> CommandParser:
        parser = super().create_parser(prog_name, subcommand, **kwargs)
        # Django builds a plain CommandParser; the subclass only changes how errors print.
        parser.__class__ = OneLineParser
        return parser

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--json", action="store_true", help="print one JSON object on one line")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            result = self.run(**options)
        except CommandError as exc:
            raise CommandError(one_line(exc), returncode=exc.returncode) from exc
        except (BillingError, ValueError) as exc:  # MoneyError is a ValueError
            raise CommandError(one_line(exc)) from exc
        except DataError as exc:
            # A value the database refused (a balance that moved past what fits since it was
            # checked): the statement's transaction wrote nothing. Its first line says why.
            first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CommandError(f"refused by the database, nothing changed: {first_line}") from exc
        if options["json"]:
            self.stdout.write(json.dumps(result, separators=(",", ":"), default=str))
        else:
            self.stdout.write(self.describe(result))
        self.after_output(result)

    def run(self, **options: Any) -> dict[str, Any]:
        raise NotImplementedError

    def describe(self, result: dict[str, Any]) -> str:
        return " ".join(f"{key}={value}" for key, value in result.items())

    def after_output(self, result: dict[str, Any]) -> None:
        """Hook for commands whose exit status depends on the result (audit_ledger)."""

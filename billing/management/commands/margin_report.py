from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from django.core.management.base import CommandError, CommandParser
from django.utils import timezone

from billing.management.base import BillingCommand
from reconciliation.selectors import margins_get


def _day(raw: str, *, what: str) -> date:
    try:
        return date.fromisoformat(raw.strip())
    except ValueError as exc:
        raise CommandError(f"invalid {what}: {raw!r} is not a date (YYYY-MM-DD)") from exc


class Command(BillingCommand):
    help = (
        "Revenue, provider cost and gross margin of the usage settled between --start and --end "
        "(UTC days, both included; default: the last 30 days), in all and by model. Usage with "
        "no provider price counts in revenue and also as unpriced_revenue, never as free."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        super().add_arguments(parser)
        parser.add_argument("--start", help="first UTC day, YYYY-MM-DD (default: 29 days ago)")
        parser.add_argument("--end", help="last UTC day, included (default: today)")

    def run(self, **options: Any) -> dict[str, Any]:
        today = timezone.now().astimezone(UTC).date()
        end = today if options["end"] is None else _day(options["end"], what="--end")
        start = (
            end - timedelta(days=29)
            if options["start"] is None
            else _day(options["start"], what="--start")
        )
        if start > end:
            raise CommandError("invalid range: --start is after --end")
        if end == date.max:
            raise CommandError("invalid --end: 9999-12-31 is out of range")
        margins = margins_get(
            start=datetime.combine(start, time(), tzinfo=UTC),
            end=datetime.combine(end + timedelta(days=1), time(), tzinfo=UTC),
        )
        return {"start": start.isoformat(), "end": end.isoformat(), **margins.as_json()}

    def describe(self, result: dict[str, Any]) -> str:
        lines = [
            f"{result['start']} to {result['end']}: revenue {result['revenue']}, provider cost "
            f"{result['provider_cost']}, gross margin {result['gross_margin']} USD "
            f"(unpriced revenue {result['unpriced_revenue']})"
        ]
        for row in result["by_model"]:
            lines.append(
                f"  {row['model']:<30} revenue {row['revenue']:>20}  provider cost "
                f"{row['provider_cost']:>20}  margin {row['gross_margin']:>20}"
            )
        return "\n".join(lines)

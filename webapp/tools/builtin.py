"""The demo company's systems as tools: sales, CRM and an email outbox, all in DuckDB.

Who may call them is not decided here but in demo_tools.toml (data, not code).
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from typing import Any, Callable

from storage import company
from webapp.tools.executor import ToolContext, ToolUserError

REGION_EN = {"华东": "East China", "华南": "South China", "华北": "North China", "西南": "Southwest China",
             "华中": "Central China"}
RELATIVE_PERIODS = ("this_month", "last_month", "this_quarter", "last_quarter", "this_year", "last_year")
_PERIOD_RE = re.compile(r"^(\d{4})(?:-Q([1-4])|-(0[1-9]|1[0-2]))?$")


@dataclass(frozen=True)
class Period:
    start: dt.date
    months: int  # 1 (month), 3 (quarter) or 12 (year)

    @property
    def end(self) -> dt.date:
        return company.add_months(self.start, self.months)

    @property
    def label(self) -> str:
        if self.months == 12:
            return f"{self.start.year}"
        if self.months == 3:
            return f"{self.start.year}-Q{(self.start.month - 1) // 3 + 1}"
        return f"{self.start:%Y-%m}"

    def back(self, periods: int = 1) -> "Period":
        return Period(company.add_months(self.start, -self.months * periods), self.months)

    def year_earlier(self) -> "Period":
        return Period(company.add_months(self.start, -12), self.months)


def parse_period(text: str, today: dt.date) -> Period:
    """'2026-Q3', '2026-07', '2026', or a relative period such as 'last_quarter'."""
    text = text.strip()
    this_month = today.replace(day=1)
    this_quarter = this_month.replace(month=(today.month - 1) // 3 * 3 + 1)
    this_year = this_month.replace(month=1)
    relative = {
        "this_month": Period(this_month, 1), "last_month": Period(this_month, 1).back(),
        "this_quarter": Period(this_quarter, 3), "last_quarter": Period(this_quarter, 3).back(),
        "this_year": Period(this_year, 12), "last_year": Period(this_year, 12).back(),
    }
    if text in relative:
        return relative[text]
    match = _PERIOD_RE.match(text)
    if not match:
        raise ToolUserError(
            f"period {text!r} is not understood; use 2026-Q3, 2026-07, 2026 or one of {', '.join(RELATIVE_PERIODS)}.")
    year, quarter, month = int(match.group(1)), match.group(2), match.group(3)
    if quarter:
        return Period(dt.date(year, (int(quarter) - 1) * 3 + 1, 1), 3)
    if month:
        return Period(dt.date(year, int(month), 1), 1)
    return Period(dt.date(year, 1, 1), 12)


def _change(current: float | None, previous: float | None) -> float | None:
    if current is None or not previous:
        return None
    return round((current - previous) / previous * 100, 1)


def query_sales(args: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
    region, metric = args["region"], args.get("metric", "revenue")
    product_line = args.get("product_line")
    period = parse_period(args["period"], ctx.today)
    first, last = company.sales_months(ctx.db)
    if first is None:
        raise ToolUserError("the sales system has no data.")

    def value(p: Period) -> float | None:
        row = company.sales_total(ctx.db, region, p.start, p.end, product_line)
        if not row["months"]:
            return None
        return float(row[metric])

    current = value(period)
    if current is None:
        raise ToolUserError(f"no sales data for {period.label}; the data covers {first:%Y-%m} to {last:%Y-%m}.")
    previous, year_ago = period.back(), period.year_earlier()
    previous_value, year_ago_value = value(previous), value(year_ago)
    months_in_data = company.sales_total(ctx.db, region, period.start, period.end, product_line)["months"]
    return {
        "region": region, "region_en": REGION_EN[region], "period": period.label,
        "metric": metric, "unit": "CNY" if metric == "revenue" else "units",
        "product_line": product_line or "all",
        "value": round(current, 2),
        "complete": months_in_data == period.months,
        "previous_period": {"period": previous.label, "value": previous_value,
                            "change_pct": _change(current, previous_value)},
        "same_period_last_year": {"period": year_ago.label, "value": year_ago_value,
                                  "change_pct": _change(current, year_ago_value)},
        "trend": [{"period": p.label, "value": value(p)} for p in (period.back(n) for n in (3, 2, 1, 0))],
    }


def lookup_customer(args: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
    query = args["name_or_id"].strip()
    matches = company.find_customers(ctx.db, query)
    if not matches:
        raise ToolUserError(f"no customer matches {query!r}.")
    return {"matches": [{**m, "annual_revenue": float(m["annual_revenue"]),
                         "customer_since": m["customer_since"].isoformat()} for m in matches]}


def send_email(args: dict[str, Any], ctx: ToolContext) -> dict[str, Any]:
    email_id = company.queue_email(ctx.db, ctx.user.id, args["to"], args["subject"], args["body"])
    return {"queued": True, "email_id": email_id, "to": args["to"]}


BUILTINS: dict[str, Callable[[dict[str, Any], ToolContext], Any]] = {
    "query_sales": query_sales,
    "lookup_customer": lookup_customer,
    "send_email": send_email,
}

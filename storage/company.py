"""The demo company's systems (sales, CRM, email outbox): tables seeded in demo mode and
the parameterised queries the demo tools run. The model never writes SQL."""

from __future__ import annotations

import datetime as dt
import random
from decimal import Decimal
from typing import Any

from storage.db import Database

REGIONS = ("华东", "华南", "华北", "西南", "华中")
PRODUCT_LINES = ("工业设备", "消费电子", "软件服务")
# Monthly base revenue (CNY) per region and product line, and the yearly growth of each
# region: East China grows, North China shrinks, so trend questions have real answers.
_BASE = {"华东": 9_000_000, "华南": 7_500_000, "华北": 6_000_000, "西南": 3_500_000, "华中": 4_200_000}
_GROWTH = {"华东": 0.18, "华南": 0.09, "华北": -0.06, "西南": 0.25, "华中": 0.03}
_LINE_SHARE = {"工业设备": 0.5, "消费电子": 0.3, "软件服务": 0.2}
_UNIT_PRICE = {"工业设备": 250_000, "消费电子": 3_000, "软件服务": 40_000}


def month_start(day: dt.date) -> dt.date:
    return day.replace(day=1)


def add_months(day: dt.date, months: int) -> dt.date:
    index = day.year * 12 + day.month - 1 + months
    return dt.date(index // 12, index % 12 + 1, 1)


def seed_sales(db: Database, today: dt.date, months: int = 27, seed: int = 7) -> int:
    """Deterministic monthly sales for the last `months` months up to this month."""
    rng = random.Random(seed)
    first = add_months(month_start(today), -(months - 1))
    rows = []
    for i in range(months):
        month = add_months(first, i)
        season = 1.0 + 0.08 * ((month.month % 12) in (11, 12, 1)) - 0.05 * (month.month in (2, 7))
        for region in REGIONS:
            trend = (1 + _GROWTH[region]) ** (i / 12)
            for line in PRODUCT_LINES:
                noise = rng.uniform(0.93, 1.07)
                revenue = round(_BASE[region] * _LINE_SHARE[line] * trend * season * noise, 2)
                rows.append((month, region, line, Decimal(str(revenue)), max(1, round(revenue / _UNIT_PRICE[line]))))
    with db.transaction() as cur:
        cur.execute("DELETE FROM sales")
        cur.executemany("INSERT INTO sales VALUES (?, ?, ?, ?, ?)", rows)
    return len(rows)


def seed_customers(db: Database) -> int:
    customers = [
        ("C001", "上海宏达机械有限公司", "华东", "制造业", "李娜", 52_000_000, dt.date(2019, 3, 1)),
        ("C002", "广州蓝海电子科技", "华南", "消费电子", "陈伟", 31_500_000, dt.date(2020, 7, 15)),
        ("C003", "北京智云软件", "华北", "软件", "王芳", 18_200_000, dt.date(2021, 1, 10)),
        ("C004", "成都天府物流", "西南", "物流", "张强", 9_800_000, dt.date(2022, 5, 20)),
        ("C005", "武汉光谷新材料", "华中", "新材料", "刘洋", 14_600_000, dt.date(2018, 11, 2)),
        ("C006", "Hangzhou Westlake Robotics", "华东", "机器人", "李娜", 27_300_000, dt.date(2023, 2, 8)),
        ("C007", "Shenzhen Pearl Batteries", "华南", "电池", "陈伟", 44_100_000, dt.date(2017, 9, 30)),
    ]
    with db.transaction() as cur:
        cur.execute("DELETE FROM customers")
        cur.executemany("INSERT INTO customers VALUES (?, ?, ?, ?, ?, ?, ?)", customers)
    return len(customers)


def sales_total(db: Database, region: str, start: dt.date, end: dt.date, product_line: str | None) -> dict[str, Any]:
    """Revenue and units in [start, end) for one region, optionally one product line."""
    row = db.query_one(
        "SELECT sum(revenue) AS revenue, sum(units) AS units, count(DISTINCT month) AS months FROM sales"
        " WHERE region = ? AND month >= ? AND month < ? AND (? IS NULL OR product_line = ?)",
        [region, start, end, product_line, product_line],
    )
    return row


def sales_months(db: Database) -> tuple[dt.date | None, dt.date | None]:
    row = db.query_one("SELECT min(month) AS first, max(month) AS last FROM sales")
    return row["first"], row["last"]


def find_customers(db: Database, name_or_id: str, limit: int = 5) -> list[dict[str, Any]]:
    # LIKE wildcards in the input are matched literally, not as patterns
    pattern = name_or_id.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return db.query(
        "SELECT id, name, region, industry, account_owner, annual_revenue, customer_since FROM customers"
        " WHERE id = upper(?) OR name ILIKE '%' || ? || '%' ESCAPE '\\' ORDER BY id LIMIT ?",
        [name_or_id, pattern, limit],
    )


def queue_email(db: Database, user_id: int, recipient: str, subject: str, body: str) -> int:
    return db.write(
        "INSERT INTO email_outbox (user_id, recipient, subject, body) VALUES (?, ?, ?, ?) RETURNING id",
        [user_id, recipient, subject, body],
    )


def outbox(db: Database) -> list[dict[str, Any]]:
    return db.query("SELECT id, user_id, recipient, subject, body, created_at FROM email_outbox ORDER BY id")

"""A tool call's closed arguments held to what the user's own words spell.

A small model that learned to call `query_sales` still slips on values: asked about 上一季度
(last quarter) it may write this_quarter, asked about 去年 it may write this_year. The tool
file already names every spelling of every closed value (enums and their aliases), so the
question can be read for them: when it spells exactly one value of a required closed
parameter and the model wrote another value from the same closed set, or nothing, the
spelled value is used. A value outside the closed set (an explicit "2025-Q4" where the
question says 去年四季度) and a question that spells two values ("this year vs last year")
are left to the model. Optional parameters are not touched: they are spelled with common
words ("sales" is also in "unit sales").
"""

from __future__ import annotations

from typing import Any

from finetune.augment import slot_vocabulary, spelled_values
from webapp.tools.registry import ToolSpec


def ground_arguments(spec: ToolSpec, arguments: dict[str, Any], question: str) -> tuple[dict[str, Any], dict]:
    """(arguments, {parameter: the model's value}) for every argument the question overruled."""
    spellings = slot_vocabulary([(spec.name, spec.parameters, spec.aliases)]).get(spec.name, {})
    result, overruled = dict(arguments), {}
    for parameter, table in spellings.items():
        spelled = spelled_values(question, table)
        if len(spelled) != 1:
            continue
        (value,) = spelled
        current = result.get(parameter)
        if current != value and (current is None or current in table.values()):
            overruled[parameter] = current
            result[parameter] = value
    return result, overruled

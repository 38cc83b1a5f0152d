"""One run as the report reads it (from results.json or a runs CSV), checked once, and written back safely.

Why a typed record: the report's numbers are means over runs, so one bad value poisons a whole row
without a trace (accuracies of -5 and 7 average to 100%, a time of 1e400 makes the median inf). The
config is checked by pydantic models (typed_sections.Section: strict types, finite numbers, ranges on
the field); a run record is checked the same way, by `RunRecord`, whichever file it came from, and a
refusal names the value, what it must be and why (`typed_sections.describe` words the range).

Why neutralised cells: a runs CSV is meant to be opened in a spreadsheet, and a cell that begins with
=, +, -, @, a tab or a carriage return is run there as a formula (CSV injection). Configurations are
Hydra overrides, and `+trick=x` is an ordinary one, so such cells occur without any malice.
`spreadsheet_cell` prefixes them with a single quote (shown as text, never evaluated); numbers stay
numbers; `restore_cell` undoes it when the report reads its own CSV back, so a round trip is exact.
"""

from __future__ import annotations

import csv
import difflib
import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cifar_speedrun.typed_sections import MAX_SEED, describe

# What train.py and the report write as a run's status (results.py, train._record_failure, report._unreadable).
STATUSES = ("ok", "running", "failed", "interrupted", "unreadable", "debug")


class RunRecord(BaseModel):
    """The fields of a run the report uses; every number finite and in its range, every type exact."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)

    configuration: str = Field(description="the run's overrides except the seed")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="the run's seed, a whole number such as 0")
    status: Literal["ok", "running", "failed", "interrupted", "unreadable", "debug"]
    test_acc: float | None = Field(None, ge=0, le=1, description="a fraction of the test set: 0.94, not 94")
    train_seconds: float | None = Field(None, ge=0, description="seconds of training, as results.json has them")
    time_to_target: float | None = Field(None, ge=0, description="training seconds until target_acc was reached")
    target_acc: float | None = Field(None, ge=0, le=1, description="a fraction: 0.94, not 94")
    epochs: int | None = Field(None, ge=0, description="epochs completed")
    width: float | None = Field(None, gt=0, description="the model's width multiplier, e.g. 0.125")
    data: str | None = None
    device: str | None = None
    commit: str | None = None
    job: int | None = Field(None, ge=0, description="the job's number in its multirun")
    error: str | None = None
    val_acc: float | None = Field(None, ge=0, le=1, description="a fraction of the held-out images: 0.94, not 94")


# Columns a runs CSV must have: without them the table cannot be rebuilt (the rest may be absent).
REQUIRED_COLUMNS = ("configuration", "seed", "status", "test_acc", "train_seconds", "time_to_target", "target_acc")
# A run that finished has these; an empty one would silently leave the run out of its row's mean.
OK_NEEDS = ("seed", "test_acc", "train_seconds")


class RecordError(ValueError):
    """One bad field of a run: which, its value as written, and what it must be."""

    def __init__(self, field: str, value: Any, problem: str) -> None:
        self.field, self.value, self.problem = field, value, problem
        super().__init__(f"{field}={value!r} {problem}")


def _problem(kind: str, field: str, context: dict[str, Any]) -> str:
    """pydantic's error type as the words a user needs, with the field's range and hint."""
    info = RunRecord.model_fields.get(field)
    what = describe(info).replace(" (or null)", "") if info is not None else "a valid value"
    hint = f" ({info.description})" if info is not None and info.description else ""
    if kind == "literal_error":
        return f"is not a status the report knows: use {', '.join(STATUSES)}"
    if kind in ("finite_number", "float_type", "float_parsing"):
        return f"is not a finite number: it must be {what}{hint}"
    if kind in ("int_type", "int_parsing", "int_from_float"):
        return f"is not an integer: it must be {what}{hint}"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        return f"is out of range: it must be {what}{hint}"
    if kind == "string_type":
        return "is not text"
    if kind == "missing":
        return "is missing"
    return f"is not valid ({kind}): it must be {what}{hint}"


def check_record(values: dict[str, Any], raw: dict[str, Any] | None = None) -> RunRecord:
    """`values` as a RunRecord, or the first bad field as a RecordError (`raw`: the values as written).

    A run with status ok must have its seed, accuracy and time: the report would otherwise drop it from
    its row's mean without saying so.
    """
    raw = values if raw is None else raw
    try:
        record = RunRecord.model_validate(values)
    except ValidationError as error:
        first = error.errors(include_url=False)[0]
        field = str(first["loc"][0]) if first["loc"] else "?"
        raise RecordError(field, raw.get(field), _problem(first["type"], field, first.get("ctx") or {})) from None
    if record.status == "ok":
        for field in OK_NEEDS:
            if getattr(record, field) is None:
                raise RecordError(field, raw.get(field), "is empty, but a run with status ok has it "
                                  "(a run that did not finish has another status)")
    return record


# ------------------------------------------------------------------------------------------------ CSV cells
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")


def _needs_quote(text: str) -> bool:
    return text.lstrip("'")[:1] in _FORMULA_START and not _PLAIN_NUMBER.fullmatch(text)


def spreadsheet_cell(value: Any) -> Any:
    """A cell a spreadsheet shows as written: text that would start a formula gets a leading quote.

    Numbers (int, float, and text that is a plain number such as '-0.5') are left as they are. Text
    that already starts with quotes before such a character gets one more, so `restore_cell` is exact.
    """
    if isinstance(value, str) and _needs_quote(value):
        return "'" + value
    return value


def restore_cell(text: str) -> str:
    """The text `spreadsheet_cell` was given (one leading quote dropped where it added one)."""
    if text.startswith("'") and _needs_quote(text[1:]):
        return text[1:]
    return text


def write_csv_rows(path: str | Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """Every CSV the report writes goes through here: each cell made spreadsheet-safe, and the file
    replaced atomically (a failure half-way leaves the previous file whole, nothing written is lost)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.writing")
    try:
        with open(temporary, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow([spreadsheet_cell(cell) for cell in header])
            for row in rows:
                writer.writerow([spreadsheet_cell(cell) for cell in row])
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


# ------------------------------------------------------------------------------------------------ reading a CSV
_INTEGERS = {name for name, info in RunRecord.model_fields.items() if info.annotation == int | None}
_NUMBERS = {name for name, info in RunRecord.model_fields.items() if info.annotation == float | None}

def _from_cell(field: str, text: str) -> Any:
    """A cell's text as the value its field holds; text that is not one is passed on for the check to refuse."""
    if text == "":
        return None
    if field in _INTEGERS:
        return int(text) if re.fullmatch(r"\s*[+-]?\d+\s*", text) else text
    if field in _NUMBERS:
        try:
            return float(text)
        except ValueError:
            return text
    return restore_cell(text)


class CsvInputError(ValueError):
    """A runs CSV the report refuses, said in one line: the file, the row and column, and the fix."""


FIX = ("correct it, or export the CSV again from the runs' multirun dir with "
       "`python -m cifar_speedrun.records.report <dir> --export-runs <csv>`")


def read_records(path: str | Path) -> list[tuple[RunRecord, int]]:
    """The runs of a CSV written by `report --export-runs`, each with its line number, all checked.

    Refused as a whole (CsvInputError) on the first problem: a missing or unknown column, a row of the
    wrong length, a value of the wrong type, not finite or out of range. Raises UnicodeDecodeError and
    csv.Error as they come (the caller says the file is not a runs CSV).
    """
    with open(path, newline="", encoding="utf-8-sig") as handle:  # -sig: a spreadsheet may add a BOM
        reader = csv.reader(handle)
        header = next(reader, None)
        if not header:
            raise CsvInputError(f"{path} is empty: a runs CSV starts with the header {','.join(REQUIRED_COLUMNS)},...; "
                                f"{FIX}")
        missing = [name for name in REQUIRED_COLUMNS if name not in header]
        if missing:
            raise CsvInputError(f"{path} lacks the column{'s' if len(missing) > 1 else ''} {', '.join(missing)}: "
                                f"a runs CSV has at least {', '.join(REQUIRED_COLUMNS)}; {FIX}")
        known = list(RunRecord.model_fields)
        for name in header:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
                guess = f" (did you mean {close[0]}?)" if close else ""
                raise CsvInputError(f"{path}: unknown column {name!r}{guess}: a runs CSV has only the columns "
                                    f"{', '.join(known)}; rename or drop it")
        duplicated = sorted({name for name in header if header.count(name) > 1})
        if duplicated:
            raise CsvInputError(f"{path}: the column {duplicated[0]!r} appears twice; keep one")
        records = []
        for number, cells in enumerate(reader, start=1):
            where = f"{path}, row {number} (line {reader.line_num})"
            if not cells:
                continue  # a blank line
            if len(cells) != len(header):
                raise CsvInputError(f"{where} has {len(cells)} cells, the header {len(header)}: a cell holding a "
                                    f"comma must be quoted; {FIX}")
            raw = dict(zip(header, cells, strict=True))
            values = {name: _from_cell(name, text) for name, text in raw.items()}
            try:
                records.append((check_record(values, raw), reader.line_num))
            except RecordError as error:
                raise CsvInputError(f"{where}, column {error.field}: {error}; {FIX}") from None
    return records


def finite(value: Any) -> bool:
    """A real, finite number (not a bool): what a plotted history value must be."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

"""How many of a sequence's pages may sit on the GPU, and which pages are always among them."""

from __future__ import annotations

import math
from dataclasses import dataclass

POLICIES = ("quest", "recent")
AGGREGATES = ("rank", "mass")


@dataclass(frozen=True)
class DecodeBudget:
    """A per-sequence GPU page budget for decode.

    `pages` (a page count) or `fraction` (of the sequence's pages, rounded up) sets the budget;
    neither means exact mode: every page resident, attention over all of them. The first
    `sink_pages` pages and the last `window_pages` pages (the one being written included) are
    always selected, so a budget is never below `sink_pages + window_pages`.

    `policy` "quest" fills the rest of the budget with the pages of highest query-aware score;
    "recent" is the dropping baseline (StreamingLLM's sinks + recent window of the same size):
    it selects the most recent pages only, so whatever falls out is never attended again.
    `aggregate` says how the query heads' page bounds become one score per page (`selection.page_scores`):
    "rank" (the default), the best rank over the heads (every head's top pages first, as Quest
    selects per head), or "mass", the largest estimated attention mass over the heads. On
    SmolLM2 passkey prompts "rank" found keys "mass" missed (docs/preemption.md).
    `dense_layers` first layers keep every page on the device and attend to all (Quest leaves
    the first two layers dense: their attention is not sparse, and their errors feed every
    later layer). `box_scale` in [0, 1]: how far from the centre of each page's min/max box of
    K its keys are taken to reach when scoring (`selection.page_scores`): 1 is Quest's upper
    bound; smaller estimates the page's largest logit (docs/preemption.md measures both).
    `select_every` n > 1: each layer selects its pages (scores, residency, fetch) every n-th
    step of a batch; the steps in between attend to the last selection's pages that are still
    resident plus the current sinks and window, with no scoring and no copies (a step's
    selection changes little from one token to the next, and the selection and the fetch are
    most of a paged step's cost: docs/preemption.md). 1, the default, selects at every step.
    """

    pages: int | None = None
    fraction: float | None = None
    sink_pages: int = 1
    window_pages: int = 2
    policy: str = "quest"
    dense_layers: int = 0
    aggregate: str = "rank"
    box_scale: float = 1.0
    select_every: int = 1

    def __post_init__(self) -> None:
        if self.pages is not None and self.fraction is not None:
            raise ValueError("DecodeBudget takes pages or fraction, not both")
        if self.pages is not None and (isinstance(self.pages, bool) or not isinstance(self.pages, int) or self.pages <= 0):
            raise ValueError(f"DecodeBudget.pages must be a positive int, got {self.pages!r}")
        if self.fraction is not None and (
            isinstance(self.fraction, bool) or not isinstance(self.fraction, (int, float))
            or not 0 < self.fraction <= 1 or math.isnan(self.fraction)
        ):
            raise ValueError(f"DecodeBudget.fraction must lie in (0, 1], got {self.fraction!r}")
        if isinstance(self.dense_layers, bool) or not isinstance(self.dense_layers, int) or self.dense_layers < 0:
            raise ValueError(f"DecodeBudget.dense_layers must be an int >= 0, got {self.dense_layers!r}")
        for name in ("sink_pages", "window_pages"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "sink_pages" else 1):
                raise ValueError(f"DecodeBudget.{name} must be an int >= {0 if name == 'sink_pages' else 1}, got {value!r}")
        if (isinstance(self.box_scale, bool) or not isinstance(self.box_scale, (int, float))
                or math.isnan(self.box_scale) or not 0 <= self.box_scale <= 1):
            raise ValueError(f"DecodeBudget.box_scale must lie in [0, 1], got {self.box_scale!r}")
        if isinstance(self.select_every, bool) or not isinstance(self.select_every, int) or self.select_every < 1:
            raise ValueError(f"DecodeBudget.select_every must be an int >= 1, got {self.select_every!r}")
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"DecodeBudget.aggregate must be one of {AGGREGATES}, got {self.aggregate!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"DecodeBudget.policy must be one of {POLICIES}, got {self.policy!r}")
        if self.pages is not None and self.pages < self.sink_pages + self.window_pages:
            raise ValueError(
                f"DecodeBudget.pages={self.pages} is below sink_pages + window_pages = {self.sink_pages + self.window_pages}"
            )

    @classmethod
    def parse(cls, value: DecodeBudget | int | float | None) -> DecodeBudget | None:
        """A budget from the one-argument forms: an int is pages, a float in (0, 1] a fraction, None none."""
        return as_budget(value)

    @property
    def exact(self) -> bool:
        return self.pages is None and (self.fraction is None or self.fraction >= 1)

    def minimum(self, num_pages: int) -> int:
        """Pages a sequence of `num_pages` pages can never go below: its sinks and its window."""
        return min(num_pages, self.sink_pages + self.window_pages)

    def wanted(self, num_pages: int) -> int:
        """The budget in pages for a sequence of `num_pages` pages (all of them in exact mode)."""
        if self.exact:
            return num_pages
        n = self.pages if self.pages is not None else math.ceil(float(self.fraction or 1) * num_pages)
        return max(self.minimum(num_pages), min(num_pages, n))


def as_budget(value: DecodeBudget | int | float | None) -> DecodeBudget | None:
    """A `DecodeBudget` from the one-argument forms: an int is pages, a float in (0, 1] a fraction."""
    if value is None or isinstance(value, DecodeBudget):
        return value
    if isinstance(value, bool):
        raise TypeError("decode_budget must be a DecodeBudget, an int (pages) or a float (fraction), got a bool")
    if isinstance(value, int):
        return DecodeBudget(pages=value)
    if isinstance(value, float):
        return DecodeBudget(fraction=value)
    raise TypeError(f"decode_budget must be a DecodeBudget, an int (pages) or a float (fraction), got {type(value).__name__}")


def share(wanted: list[int], minimum: list[int], capacity: int) -> list[int]:
    """Budgets of sequences sharing `capacity` pages: what each wants while it fits, else a fair cut.

    Under pressure every sequence keeps its minimum (sinks + window) and the pages left over are
    split in proportion to what each wanted beyond it. Raises ValueError when even the minimums
    do not fit (the caller refuses a new sequence before that happens).
    """
    if sum(minimum) > capacity:
        raise ValueError(f"sinks + windows of {len(wanted)} sequences need {sum(minimum)} pages, the pool holds {capacity}")
    if sum(wanted) <= capacity:
        return list(wanted)
    extra = [w - m for w, m in zip(wanted, minimum)]
    spare = capacity - sum(minimum)
    total = sum(extra)
    return [m + (e * spare) // total for m, e in zip(minimum, extra)]

"""Bulk operations over many sends with the loop in C: the one place for such speed tricks.

The settle path and the batchers touch every send of a batch (10,000 at a time
for S3 and SQL). The core is written as plain loops; a trick lives here only
when it measurably beats the plain loop, behind a name that says what it does.

Measured with `timeit` on the project's 2-core machine (CPython 3.11.7), over
10,000 sends, best of 30 (see issue 13):
- `update_each` (`deque(map(dict.update, ...), maxlen=0)`): 1.6 ms, against
  2.8 ms for `for outcome in outcomes: outcome.detail.update(items)`. Kept.
- `deque(map(setattr, ...), maxlen=0)` to set one field on every outcome:
  0.59 ms, against 0.17 ms for a plain `for` loop (the interpreter
  specialises a slot store in a loop; `setattr` through `map` is generic).
  Dropped: the core sets fields in plain loops.
- `itertools.compress(sends, map(OPEN.__contains__, map(attrgetter(...), sends)))`
  to keep the open sends: 0.94 ms, against 0.30 ms for a list comprehension
  over `send.outcome.status`. Dropped.
- `deque(map(mapping.pop, keys, repeat(None)), maxlen=0)` to drop sends from
  `unfinished`: 0.92 ms, against 0.81 ms for a loop. Dropped.
Must not touch actors, loops or any network client.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from itertools import repeat
from typing import Any

_consume = collections.deque(maxlen=0).extend  # runs an iterator to its end, keeping nothing


def update_each(mappings: Iterable[dict[str, Any]], items: dict[str, Any]) -> None:
    """`each.update(items)` for every dict: a batch's shared detail on each send's outcome.

    `dict.update` mapped in C: 1.6 ms for 10,000 outcomes, 2.8 ms as a `for` loop.
    """
    _consume(map(dict.update, mappings, repeat(items)))

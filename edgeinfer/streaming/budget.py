"""How the memory plan splits the budget left after resident weights among streamed nodes."""
from __future__ import annotations


def split_budget(spare: int, minimums: list[int], demands: list[tuple[float, int] | None]) -> list[int]:
    """Each streamed node's share: its minimum plus a part of `spare` in proportion to its
    demand (bytes it would like per token), never above what it can use (the demand's
    second item); what a capped node cannot use goes to the others. A node with no demand
    estimate (None) counts as the mean of the known ones.

    By demand, not in equal parts: layers whose predicted active set is larger get larger
    windows; with equal parts the densest layers thrash while sparse ones hold neurons
    they never use."""
    n = len(minimums)
    if spare <= 0 or not n:
        return list(minimums)
    known = [d for d in demands if d is not None]
    mean = sum(d[0] for d in known) / len(known) if known else 1.0
    want = [max(d[0], 1.0) if d is not None else max(mean, 1.0) for d in demands]
    cap = [d[1] - m if d is not None else None for d, m in zip(demands, minimums)]
    extra = [0] * n
    open_ = [i for i in range(n) if cap[i] is None or cap[i] > 0]
    left = spare
    while left > 0 and open_:
        total = sum(want[i] for i in open_)
        give = {i: int(left * want[i] / total) for i in open_}
        capped = [i for i in open_ if cap[i] is not None and extra[i] + give[i] >= cap[i]]
        if not capped:
            for i in open_:
                extra[i] += give[i]
            break
        for i in capped:                      # fill the capped ones, then split the rest again
            left -= cap[i] - extra[i]
            extra[i] = cap[i]
        open_ = [i for i in open_ if i not in capped]
    return [m + e for m, e in zip(minimums, extra)]

"""A progress bar on stderr for the evaluators' long phases (MMVP's questions and judging, the
miner's embedding and all-pairs search), or an object that does nothing when progress is off.

Its own module because ``mmvp.py``, ``image_embedding.py`` and ``pair_search.py`` each draw one and
none should import another; tqdm is imported only when a bar is shown.
"""

from __future__ import annotations

import sys


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, desc: str, unit: str, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, smoothing=0.1)

"""A progress bar on stderr for the miner's long phases (embedding, the all-pairs search), or an
object that does nothing when progress is off.

Its own module because both ``image_embedding.py`` and ``pair_search.py`` draw one and neither
should import the other; tqdm is imported only when a bar is shown.
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

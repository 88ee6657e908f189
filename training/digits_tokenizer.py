"""A CLIPTokenizer built offline: CLIP's byte-level alphabet plus BPE merges learned from prompts.

The vocabulary is laid out like OpenAI CLIP's: the 256 byte symbols, the same 256 with the
end-of-word marker "</w>", one token per merge, then <|startoftext|> and <|endoftext|>. Every prompt
word becomes a single token; any other ASCII (or UTF-8) text still tokenizes through the byte
symbols, so no prompt is ever rejected.
"""

from __future__ import annotations

from collections import Counter

from transformers import CLIPTokenizer

from driffusion.export.tiny import bytes_to_unicode

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"


def learn_merges(words: Counter[str]) -> list[tuple[str, str]]:
    """Plain BPE training (Sennrich et al. 2016): repeatedly merge the most frequent adjacent pair
    until every word is one symbol. Ties break lexicographically, so the result is deterministic."""
    byte_char = bytes_to_unicode()
    split = {}
    for word in words:
        chars = [byte_char[b] for b in word.encode("utf-8")]
        chars[-1] += END_OF_WORD
        split[word] = tuple(chars)
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, symbols in split.items():
            for pair in zip(symbols[:-1], symbols[1:], strict=True):
                pairs[pair] += words[word]
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for word, symbols in split.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            split[word] = tuple(out)


def build_tokenizer(corpus: list[str], model_max_length: int = 77) -> CLIPTokenizer:
    """A CLIPTokenizer whose merges make each word of `corpus` one token (checked before return)."""
    # CLIP's pre-tokenizer lower-cases and splits letters runs and single numerals apart.
    words = Counter(w for text in corpus for w in _pre_tokenize(text))
    merges = learn_merges(words)
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [c + END_OF_WORD for c in alphabet] + ["".join(m) for m in merges]
    tokens += [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
    for word in words:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise RuntimeError(f"word {word!r} did not become one token: {ids}")
    return tokenizer


def _pre_tokenize(text: str) -> list[str]:
    import re

    return re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", text.lower())

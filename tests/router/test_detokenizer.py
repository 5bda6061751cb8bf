import random

import pytest

from router.detokenizer import IncrementalDetokenizer, StopResult, StopSequenceMatcher

PROMPT = "<|im_start|>user\nSay something<|im_end|>\n<|im_start|>assistant\n"
TEXTS = [
    "Hello 😀 world 你好世界 🎉🎉 ok",
    "naïve café — “quotes” and Ελληνικά, русский, 日本語のテキスト.",
    "  leading spaces\n\n\ttabs and 👩‍👩‍👧 family 🇫🇷 flag",
    "plain ascii text with numbers 12345 and symbols #$%&",
]


def stream(tokenizer, prompt_ids, ids, **kw):
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, **kw)
    pieces = [detok.add(i) for i in ids]
    return pieces, detok.flush()


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_concatenate_to_full_decode(smollm2_tokenizer, text):
    tok = smollm2_tokenizer
    prompt_ids = tok.encode(PROMPT, add_special_tokens=False).ids
    ids = tok.encode(text, add_special_tokens=False).ids
    pieces, rest = stream(tok, prompt_ids, ids)
    assert rest == ""
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=False) == text
    assert not any("\ufffd" in p for p in pieces)


def test_multibyte_char_held_until_complete(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = tok.encode("a😀", add_special_tokens=False).ids
    # The emoji's 4 UTF-8 bytes are spread over several byte-level tokens.
    assert len(ids) >= 3 and "\ufffd" in tok.decode(ids[:-1])
    pieces, _ = stream(tok, [], ids)
    assert pieces[0] == "a"
    assert pieces[1:-1] == [""] * (len(ids) - 2)
    assert pieces[-1] == "😀"


def test_flush_releases_incomplete_tail(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = tok.encode("ok 你", add_special_tokens=False).ids
    truncated = ids[:-1]  # generation stopped in the middle of the character
    pieces, rest = stream(tok, [], truncated)
    assert "".join(pieces) + rest == tok.decode(truncated)
    assert rest.endswith("\ufffd")


def test_random_token_ids_round_trip(smollm2_tokenizer):
    """Arbitrary ids (incl. lone UTF-8 fragments): pieces + flush always equal the full decode."""
    tok = smollm2_tokenizer
    rng = random.Random(1)
    vocab = tok.get_vocab_size()
    prompt_ids = tok.encode(PROMPT, add_special_tokens=False).ids
    for _ in range(20):
        ids = [rng.randrange(2, vocab) for _ in range(40)]
        pieces, rest = stream(tok, prompt_ids, ids)
        assert "".join(pieces) + rest == tok.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("skip", [False, True])
def test_special_tokens(smollm2_tokenizer, skip):
    tok = smollm2_tokenizer
    end = tok.token_to_id("<|im_end|>")
    ids = tok.encode("Hi there", add_special_tokens=False).ids + [end]
    pieces, rest = stream(tok, [], ids, skip_special_tokens=skip)
    assert pieces[-1] == ("" if skip else "<|im_end|>")
    assert "".join(pieces) + rest == tok.decode(ids, skip_special_tokens=skip)


def test_keeps_bounded_window(smollm2_tokenizer):
    tok = smollm2_tokenizer
    prompt_ids = tok.encode(PROMPT * 20, add_special_tokens=False).ids
    detok = IncrementalDetokenizer(tok, prompt_ids)
    assert len(detok._ids) == 5
    for i in tok.encode("word " * 200, add_special_tokens=False).ids:
        detok.add(i)
        assert len(detok._ids) <= 6


def test_empty_prompt_first_token(smollm2_tokenizer):
    tok = smollm2_tokenizer
    ids = tok.encode(" Hello", add_special_tokens=False).ids
    pieces, _ = stream(tok, [], ids)
    assert "".join(pieces) == " Hello"


# -- StopSequenceMatcher -------------------------------------------------------------------------


def run(matcher, pieces):
    out, result = [], None
    for p in pieces:
        result = matcher.feed(p)
        out.append(result.text_to_emit)
        if result.stopped:
            break
    else:
        out.append(matcher.flush())
    return "".join(out), result


def test_no_stops_passes_through():
    m = StopSequenceMatcher([], include_stop=False)
    assert m.feed("abc") == StopResult("abc", False, None)
    assert m.flush() == ""
    m = StopSequenceMatcher([""], include_stop=False)  # empty stop ignored, not "stop at once"
    assert m.feed("abc") == StopResult("abc", False, None)


def test_tgi_mode_keeps_stop_text_and_stops():
    m = StopSequenceMatcher(["\n\n", "END"], include_stop=True)
    assert m.feed("Hello") == StopResult("Hello", False, None)
    assert m.feed(" E") == StopResult(" E", False, None)  # no hold-back in TGI mode
    assert m.feed("N") == StopResult("N", False, None)
    assert m.feed("D!") == StopResult("D!", True, "END")  # spans three pieces; token text whole
    assert m.stopped
    assert m.feed("more") == StopResult("", True, "END")
    assert m.flush() == ""


def test_openai_mode_truncates_and_holds_back():
    m = StopSequenceMatcher(["</answer>"], include_stop=False)
    assert m.feed("42 <") == StopResult("42 ", False, None)  # "<" could start the stop
    assert m.feed("/ans") == StopResult("", False, None)
    assert m.feed("wer> trailing") == StopResult("", True, "</answer>")
    assert m.flush() == ""


def test_openai_mode_releases_false_alarm():
    m = StopSequenceMatcher(["</answer>"], include_stop=False)
    assert m.feed("a </an").text_to_emit == "a "
    assert m.feed("chor>").text_to_emit == "</anchor>"  # could no longer be the stop: released
    assert m.feed(" </").text_to_emit == " "
    assert m.flush() == "</"  # generation ended (length/EOS): the held tail is real output
    assert m.flush() == ""


def test_openai_mode_stop_inside_one_piece():
    m = StopSequenceMatcher(["STOP"], include_stop=False)
    assert m.feed("abcSTOPdef") == StopResult("abc", True, "STOP")


def test_first_completed_stop_wins():
    # "bc" completes before "abcd" when reading left to right.
    for include in (True, False):
        text, res = run(StopSequenceMatcher(["abcd", "bc"], include_stop=include), ["xabcd"])
        assert res.matched == "bc"
        assert text == ("xabcd" if include else "xa")
    # Same end: the longer (earlier-starting) one.
    _, res = run(StopSequenceMatcher(["c", "abc"], include_stop=False), ["ab", "c"])
    assert res.matched == "abc"


def test_overlapping_partial_prefixes():
    m = StopSequenceMatcher(["aab"], include_stop=False)
    assert m.feed("xaa").text_to_emit == "x"
    assert m.feed("a").text_to_emit == "a"  # "aaa": only the last "aa" can still become "aab"
    assert m.feed("b") == StopResult("", True, "aab")


def _first_stop(text, stops):
    """Brute-force reference: (end, stop) of the stop completing first, longest on a tie."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            return end, max(done, key=len)
    return None


@pytest.mark.parametrize("include", [True, False])
def test_matches_reference_for_any_piece_boundaries(include):
    rng = random.Random(int(include))
    stops = ["ab", "bca", "cc\n", "xyz", "czzxyzc"]
    for _ in range(500):
        text = "".join(rng.choice("abcxyz\n") for _ in range(rng.randrange(1, 30)))
        cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randrange(0, 6))))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
        got, res = run(StopSequenceMatcher(stops, include_stop=include), pieces)
        ref = _first_stop(text, stops)
        assert res.stopped == (ref is not None)
        if ref is None:
            assert got == text and res.matched is None
            continue
        end, stop = ref
        assert res.matched == stop
        if include:  # TGI: every piece up to and including the one completing the stop
            ends = [j for j in [*cuts, len(text)] if j >= end]
            assert got == text[: ends[0]]
        else:  # OpenAI: everything before the stop, nothing after
            assert got == text[: end - len(stop)]


def test_window_stays_bounded():
    m = StopSequenceMatcher(["abc", "z"], include_stop=False)
    for _ in range(1000):
        m.feed("xyxyxy ab")
        assert len(m._tail) <= 2

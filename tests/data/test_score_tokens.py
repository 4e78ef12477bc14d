import pytest

from tract_dist.data.score_tokens import ScoreTokenError, derive_score_tokens, parse_scale, score_prompt_ids


def test_mistral_ids(tokenizers):
    assert derive_score_tokens(tokenizers["mistral"]).token_ids == [28740, 28750, 28770, 28781, 28782]


def test_llama3_ids(tokenizers):
    assert derive_score_tokens(tokenizers["llama3"]).token_ids == [16, 17, 18, 19, 20]


@pytest.mark.parametrize("name", ["mistral", "llama3", "smollm2"])
def test_ids_decode_to_their_digits(tokenizers, name):
    tok = tokenizers[name]
    st = derive_score_tokens(tok, "1-5")
    assert [tok.decode([t]).strip() for t in st.token_ids] == ["1", "2", "3", "4", "5"]
    # The derived ids really are what the tokenizer emits last for the full phrase.
    for k, t in zip(st.scores, st.token_ids):
        assert tok.encode(f"Good. So the overall score is {k}", add_special_tokens=False)[-1] == t


def test_scale_1_to_10_with_a_tokenizer_that_has_10(tokenizers):
    st = derive_score_tokens(tokenizers["llama3"], "1-10")
    assert st.scores == list(range(1, 11))
    assert tokenizers["llama3"].decode([st.token_ids[-1]]) == "10"


@pytest.mark.parametrize("name", ["mistral", "smollm2"])
def test_scale_1_to_10_fails_when_10_is_two_tokens(tokenizers, name):
    with pytest.raises(ScoreTokenError, match="score 10 is not a single token"):
        derive_score_tokens(tokenizers[name], "1-10")


def test_scale_parsing():
    assert parse_scale("0-9") == (0, 9)
    for bad in ("5-1", "x", "1-"):
        with pytest.raises(ValueError):
            parse_scale(bad)


@pytest.mark.parametrize("name", ["mistral", "llama3", "smollm2"])
def test_score_prompt_ends_where_the_score_is_predicted(tokenizers, name):
    tok = tokenizers[name]
    st = derive_score_tokens(tok)
    ids = score_prompt_ids(tok, "Nice answer.", st)
    for k, t in zip(st.scores, st.token_ids):
        assert tok.encode(f"Nice answer. So the overall score is {k}", add_special_tokens=False) == ids + [t]


@pytest.mark.parametrize("name", ["mistral", "smollm2"])
def test_multi_token_scale_1_to_10(tokenizers, name, capsys):
    """#29: "10" is "1", "0"; "1" is then a prefix of "10" and ends with the EOS training appends after the score."""
    from tract_dist.data.score_scale import derive_score_scale, scale_prompt_ids, value_text_tokens

    tok = tokenizers[name]
    sc = derive_score_scale(tok, "1-10")
    digit = derive_score_tokens(tok, "0-9").token_ids  # the ids of "0".."9" after the phrase
    assert not sc.single_token and sc.terminator == tok.eos_token_id
    assert sc.sequences == [(digit[1], tok.eos_token_id)] + [(t,) for t in digit[2:]] + [(digit[1], digit[0])]
    assert sc.trie.nodes == ((), (digit[1],))
    ids = scale_prompt_ids(tok, "Nice answer.", sc)
    for k in sc.scores:  # what the tokenizer writes after the phrase is exactly each value's text tokens
        assert tok.encode(f"Nice answer. So the overall score is {k}", add_special_tokens=False) == \
            ids + list(value_text_tokens(sc, k))
    import json

    from tract_dist.cli import main

    assert main(["score-tokens", "--tokenizer", name, "--scale", "1-10"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["sequences"] == [list(q) for q in sc.sequences] and shown["nodes"] == [[], [digit[1]]]


def test_wide_scales(tokenizers):
    from tract_dist.data.score_scale import derive_score_scale

    llama = derive_score_scale(tokenizers["llama3"], "0-100")  # one token each: the single-token form, unchanged
    assert llama.single_token and llama.score_tokens() == derive_score_tokens(tokenizers["llama3"], "0-100")
    smol = derive_score_scale(tokenizers["smollm2"], "0-100")  # digits: the root, "1".."9" and "10"
    eos = tokenizers["smollm2"].eos_token_id
    assert len(smol.trie.nodes) == 11 and len(smol.sequences[100]) == 3 and smol.sequences[10][-1] == eos
    assert smol.sequences[0] == smol.sequences[100][1:2] and smol.sequences[55][-1] != eos  # "0" alone; "55" a leaf

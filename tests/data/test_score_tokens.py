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

from engine.models.tokenizer import BOS_ID, EOS_ID, clip_tokenizer, tokenize


def test_known_ids():
    assert tokenize("a photo of a cat") == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_full_vocabulary_and_length():
    tok = clip_tokenizer()
    assert len(tok) == 49408
    assert tok.model_max_length == 77
    assert tok.bos_token_id == BOS_ID and tok.eos_token_id == EOS_ID


def test_openclip_padding_token():
    assert clip_tokenizer("!").pad_token_id == 0
    assert clip_tokenizer().pad_token_id == EOS_ID


def test_punctuation_and_weights_syntax_tokens():
    # "(" and ":" are ordinary BPE tokens; the prompt parser removes them before tokenising
    assert tokenize("red, circle")[1:-1] == [736, 267, 7117]

"""Our CLIP tokenizer against transformers' CLIPTokenizer, built offline from the same merges file."""

import warnings

import pytest
import torch
import transformers

from helpers import write_clip_tokenizer_files
from nanocustom.tokenizer import Tokenizer

LONG = "a highly detailed oil painting of a lighthouse on a cliff at dusk, dramatic clouds, " * 6
PROMPTS = [
    "",
    "a photo of a dog",
    "A Photo Of A DOG",
    "A PHOTO OF A DOG!!!",
    "a photo of a sks dog",
    "photo of a V* cat, sitting on a chair",
    "hello, world. how are you? fine; thanks: ok!",
    "don't",
    "it's a dog's life",
    "we'll see what they've done, I'm sure you'd agree they're right",
    "DON'T STOP",
    "rock 'n' roll",
    "it’s a “quoted” word",  # curly quotes: kept as they are (OpenAI's ftfy would straighten them)
    "café au lait",
    "naïve résumé",
    "cafe\u0301 with a combining accent",  # NFD input, NFC makes it "café"
    "straße in München",
    "ΟΔΟΣ ΣΟΦΙΑΣ",  # capital sigma at a word's end
    "İstanbul at night",
    "a cute cat 🐱 with a hat 🎩",
    "🔥🔥🔥",
    "👨‍👩‍👧 family emoji with zero-width joiners",
    "東京タワーの夜景",
    "一只可爱的猫",
    "한국어 문장입니다",
    "красивый закат над морем",
    "غروب الشمس فوق البحر",
    "שלום עולם",
    "नमस्ते दुनिया",
    "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ",
    "ﬁne ligature",
    "1234567890",
    "3.14159 and 2,718 and 1e-5",
    "a 4k 8K uhd 16:9 photo, f/1.8, 50mm",
    "version v1.5 vs v2.1",
    "a   photo    of  a   dog",
    "  leading and trailing spaces  ",
    "line one\nline two\r\nline three",
    "tabs\tbetween\t\twords",
    "non\u00a0breaking\u2003em space",
    "\n\t  \n",
    "<b>bold</b> <i>italic</i>",
    '<a href="https://example.com/x?y=1&z=2">link</a>',
    "fish &amp; chips &lt;3 &#39;quoted&#39;",
    "(masterpiece:1.2), [bad hands], {best quality}",
    "trending on artstation | octane render | 8k",
    "#hashtag @mention $100 50% ~tilde `code` ^caret",
    "email: someone@example.com",
    "C:\\path\\to\\file.png",
    "...---...",
    "'single quotes' and \"double quotes\"",
    "'s 't 're",
    "<|startoftext|>a prompt with special tokens in it<|endoftext|>",
    "<|ENDOFTEXT|>",
    "a\u200bzero width space",
    "control\x1cchar",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "pneumonoultramicroscopicsilicovolcanoconiosis " * 8,
    LONG,
    "word " * 75,  # exactly 75 tokens: fits, no warning
    "word " * 76,  # one too many
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


@pytest.fixture(scope="module")
def ref_dir(tmp_path_factory):
    return write_clip_tokenizer_files(tmp_path_factory.mktemp("clip_tokenizer"))


def make_ref(ref_dir):
    # transformers 5 has one CLIP tokenizer, tokenizers-backed; CLIPTokenizerFast is an alias of it
    assert transformers.CLIPTokenizerFast is transformers.CLIPTokenizer
    return transformers.CLIPTokenizer.from_pretrained(ref_dir)


@pytest.fixture(scope="module")
def ref(ref_dir):
    return make_ref(ref_dir)


def ref_encode(ref, prompts):
    return ref(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def test_vocabulary_is_openais_49408_ids(tok, ref):
    assert len(tok) == len(ref) == 49408
    assert (tok.token_id("ktn"), tok.token_id("pll"), tok.token_id("ucd</w>")) == (42170, 47629, 43514)
    assert (tok.token_id("!"), tok.token_id("!</w>")) == (0, 256)
    assert (tok.token_id("<|startoftext|>"), tok.token_id("<|endoftext|>")) == (49406, 49407)
    assert tok.backend.get_vocab() == ref.get_vocab()


def test_known_prompt_ids(tok, ref):
    expected = [49406, 320, 1125, 539, 320, 1929, 49407]
    assert ref("a photo of a dog").input_ids == expected
    assert tok.encode("a photo of a dog")[0].tolist() == expected + [49407] * 70


def test_prompt_list_is_varied_enough():
    assert len(PROMPTS) >= 50 and len(set(PROMPTS)) == len(PROMPTS)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_ids_equal_transformers_and_warn_only_when_cut(tok, ref, prompt):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = tok.encode([prompt])
    assert torch.equal(ours, ref_encode(ref, [prompt]))
    n_tokens = len(ref(prompt, add_special_tokens=False).input_ids)
    assert len(caught) == (n_tokens > 75)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_bpe_pieces_equal_transformers(tok, ref, prompt):
    assert tok.tokenize(prompt) == ref.tokenize(prompt)


def test_batch_is_B_by_77_long_padded_with_eos(tok, ref):
    batch = tok.encode(PROMPTS[:8])
    assert batch.shape == (8, 77) and batch.dtype == torch.long
    assert torch.equal(batch, ref_encode(ref, PROMPTS[:8]))
    assert torch.equal(tok.encode(PROMPTS[1]), batch[1:2])  # a single str is a batch of one
    assert (batch[0] == torch.tensor([49406] + [49407] * 76)).all()  # "" is BOS then EOS padding, never 0


def test_long_prompt_is_cut_to_75_tokens_with_a_warning_showing_the_cut(tok, ref):
    n = len(tok.tokenize(LONG))
    assert n > 75
    with pytest.warns(UserWarning) as caught:
        ids = tok.encode(LONG)
    assert torch.equal(ids, ref_encode(ref, [LONG]))
    assert ids[0, -1] == 49407 and (ids[0] == 49407).sum() == 1  # EOS last, no padding left
    message = str(caught[0].message)
    cut = tok.decode(ref(LONG, add_special_tokens=False).input_ids[75:])
    assert f"{n - 75} were cut" in message and cut in message


def test_decode_gives_back_clean_text_as_transformers(tok, ref):
    for prompt in ["a photo of a dog", "Café, naïve: don't!", "東京 🐱"]:
        ids = tok.encode(prompt)[0]
        assert tok.decode(ids) == ref.decode(ids.tolist(), skip_special_tokens=True)
    assert tok.decode(tok.encode("A  Photo of a DOG")[0]) == "a photo of a dog"
    assert tok.decode([49406, 320, 49407], skip_special_tokens=False) == "<|startoftext|>a <|endoftext|>"


def test_added_tokens_get_next_ids_and_encode_as_transformers(ref_dir):
    tok, ref = Tokenizer(), make_ref(ref_dir)
    assert ref.add_tokens(["<new1>", "<new2>"]) == 2
    assert tok.add_tokens(["<new1>", "<new2>"]) == [49408, 49409]
    assert tok.add_tokens(["<new1>"]) == [49408]  # re-adding keeps the id
    assert len(tok) == len(ref) == 49410
    assert tok.token_id("<new2>") == ref.convert_tokens_to_ids("<new2>") == 49409

    prompts = [
        "photo of a <new1> square",
        "<new1>",
        "<new1> <new2>",
        "<new1><new2>",
        "a<new1>b",
        "photo of a <NEW1> dog",  # added tokens match the lowercased text, as in transformers
        "the <new1>'s tail, <new2>-like",
        "<new 1> is not the token",
        "<new1>" + " word" * 80,
    ]
    with pytest.warns(UserWarning, match="6 were cut"):  # the last prompt
        ours = tok.encode(prompts)
    assert torch.equal(ours, ref_encode(ref, prompts))
    assert ours[0, :7].tolist() == [49406, 1125, 539, 320, 49408, 3999, 49407]
    for p in prompts:
        assert tok.tokenize(p) == ref.tokenize(p)


def test_added_tokens_stay_on_their_tokenizer(ref_dir):
    tok = Tokenizer()
    tok.add_tokens(["<new1>"])
    assert len(Tokenizer()) == 49408


def test_unknown_token_id_raises(tok):
    with pytest.raises(KeyError):
        tok.token_id("<not-a-token>")


def test_text_cleanup_is_transformers_not_openai_ftfy(tok):
    """transformers (and so the SD v1 pipelines of diffusers) skips ftfy and html.unescape, which OpenAI's
    simple_tokenizer.py runs. We follow transformers; these are the cases where the two give different ids."""
    assert tok.tokenize("fish &amp; chips")[1:4] == ["&</w>", "amp</w>", ";</w>"]  # OpenAI: "&" alone
    assert tok.tokenize("it’s") != tok.tokenize("it's")  # OpenAI's ftfy straightens the quote
    assert tok.tokenize("ΟΔΟΣ") == tok.tokenize("οδοσ")  # per-character lowercase; Python's lower() gives "οδος"
    assert tok.encode("<|ENDOFTEXT|>")[0, 1] != 49407  # OpenAI lowercases first and finds the special token

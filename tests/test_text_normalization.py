"""The text pipeline in front of chunking: LLM cleanup, language choice and verbalization per language family."""

import socket

import pytest

from conftest import import_module

normalization = import_module("text_normalization")
cleanup = import_module("text_cleanup")
language = import_module("text_language")
numbers = import_module("text_numbers")

# (language, written, spoken): one row per rule and per language family.
SPOKEN = [
    # English, WeTextProcessing, with our fixes of its slips.
    ("en", "Call me at 3:30 pm on May 5th.", "Call me at three thirty PM on May fifth."),
    ("en", "It costs $20.50.", "It costs twenty dollars and fifty cents."),  # library: "twenty point five dollars"
    ("en", "It costs $1.", "It costs one dollar."),
    ("en", "We had 1,234 visitors.", "We had one thousand, two hundred and thirty-four visitors."),  # lost "one"
    ("en", "Revenue was $1.5M.", "Revenue was one point five million dollars."),
    ("en", "Prices rose 15% to 5 kg.", "Prices rose fifteen percent to five kilograms."),
    ("en", "It was 25°C.", "It was twenty five degrees Celsius."),
    ("en", "It is 9:30 on Dec. 7, 2026.", "It is nine thirty on the seventh of december, twenty twenty six."),  # "Dec."
    ("en", "Since Sept. 11 and March 3, 2020.", "Since the eleventh of september and the third of march, twenty twenty."),
    # Chinese, WeTextProcessing, punctuation kept full-width, ¥ read as 元.
    ("zh", "今天是2024年3月5日，气温25℃。", "今天是二零二四年三月五日，气温二十五摄氏度。"),
    ("zh", "价格是¥20.5，增长了15%。", "价格是二十点五元，增长了百分之十五。"),
    ("zh", "下午3:30开会。", "下午三点三十分开会。"),
    # Germanic (num2words + our table): decimal comma, grouped thousands with ".", clock, units, date ordinals.
    ("de", "Am 5. Mai um 15:30 kostet es 20,50 €.", "Am fünften Mai um fünfzehn Uhr dreißig kostet es zwanzig Euro fünfzig."),
    ("de", "Es sind 1.234 Leute, 15 % mehr.", "Es sind eintausendzweihundertvierunddreißig Leute, fünfzehn Prozent mehr."),
    ("de", "Bei -3 Grad und 3,14 km.", "Bei minus drei Grad und drei Komma eins vier Kilometer."),
    ("sv", "Det kostar 5 €.", "Det kostar fem euro."),
    ("da", "Klokken 8:15.", "Klokken otte femten."),
    # Romance.
    ("fr", "Il est 8:05, ça coûte 3 € et 12,5 kg.", "Il est huit heures cinq, ça coûte trois euros et douze virgule cinq kilogrammes."),
    ("es", "Cuesta $1.000,50, un 20% más.", "Cuesta mil dólares cincuenta, un veinte por ciento más."),
    ("it", "Pesa 3,14 kg.", "Pesa tre virgola uno quattro chilogrammi."),  # num2words alone: "tre"
    ("pt", "São 2 km.", "São dois quilômetros."),
    # Slavic.
    ("ru", "Цена 20,50 € и 15%.", "Цена двадцать евро пятьдесят и пятнадцать процентов."),
    ("pl", "Jest -5 stopni.", "Jest minus pięć stopni."),  # num2words alone raises on negatives
    ("cs", "Stojí 5,50 € a 3,5 kg.", "Stojí pět eur padesát a tři celá pět kg."),
    # Others: Hungarian, Turkish (percent before the number), Semitic and Persian (decimal point), CJK without WeText.
    ("hu", "Ez 15%.", "Ez tizenöt százalék."),
    ("tr", "Saat 15:30, %15 indirim.", "Saat onbeş otuz, yüzde onbeş indirim."),
    ("he", "המחיר 3.5 ₪, לא 3.5.", "המחיר שלוש שקלים חמישים, לא שלוש נקודה חמש."),
    ("ar", "السعر 20.5", "السعر عشرون فاصلة خمسة"),  # num2words alone: "عشرون  , خمسون"
    ("fa", "قیمت 0.05 است", "قیمت صفر ممیز صفر پنج است"),  # num2words alone: "half"
    ("ko", "3.5 퍼센트", "삼 점 오 퍼센트"),
    ("ja", "価格は$20.50です。15:30", "価格は二十ドル五十です。十五時三十分"),
    # Greek: no number speller; the digits stay rather than being read with another language's rules.
    ("el", "Έχω 3 γάτες.", "Έχω 3 γάτες."),
]


@pytest.mark.parametrize("lang, written, spoken", SPOKEN, ids=[f"{row[0]}-{index}" for index, row in enumerate(SPOKEN)])
def test_numbers_are_spoken_in_the_texts_language(lang, written, spoken):
    assert normalization.normalize_text(written, lang, cleanup=False).text == spoken


CLEANED = [
    ("# Title\n\nThis is **bold** and *it* and ~~gone~~ text", "Title. This is bold and it and gone text."),
    ("- one\n- two\n1. first\n2) second", "one. two. first. second."),
    ("See [the docs](https://x.com) at https://y.org/a?b=1 now!!!", "See the docs at now!"),
    ("Run `pip install x` like this:\n```bash\npip install x\n```\nDone", "Run pip install x like this: Done."),
    ("Great 🎉🎉 job 👍🏽!!! Really?!", "Great job! Really?"),
    ("| a | b |\n|---|---|\n| 1 | 2 |", "a, b. 1, 2."),
    ("> a quote\n\n---\n\n<b>bold</b> text", "a quote. bold text."),
    ("你好\n世界", "你好。世界。"),
    ("Wait.... what", "Wait... what."),
    ("snake_case is said, and $5, 15% and 3:30 stay for verbalization", "snake case is said, and $5, 15% and 3:30 stay for verbalization."),
]


@pytest.mark.parametrize("written, cleaned", CLEANED)
def test_language_model_markup_is_removed(written, cleaned):
    assert cleanup.clean_text(written) == cleaned


DETECTED = [
    ("Der Hund ist nicht groß und die Katze schläft.", "de"), ("The dog is big and the cat sleeps.", "en"),
    ("El perro es grande y la casa es bonita.", "es"), ("Le chien est dans la maison avec nous.", "fr"),
    ("Ciao, come stai? Il cane è bello.", "it"), ("O cão não está em casa.", "pt"),
    ("Cześć, jak się masz?", "pl"), ("Jak se máš? Je to dobré.", "cs"), ("Hej, hur mår du? Det är bra.", "sv"),
    ("Jeg er træt og det er sent.", "da"), ("Ez egy könnyű szöveg, és nem hosszú.", "hu"),
    ("Merhaba, nasılsın? Bu çok güzel.", "tr"), ("Привет, как дела?", "ru"), ("Γειά σου κόσμε", "el"),
    ("שלום עולם", "he"), ("مرحبا بالعالم", "ar"), ("سلام، این یک متن فارسی است", "fa"),
    ("こんにちは世界", "ja"), ("你好世界", "zh"), ("안녕하세요", "ko"), ("12345", "en"),
]


@pytest.mark.parametrize("text, expected", DETECTED)
def test_language_is_detected_from_script_then_words(text, expected):
    assert language.detect_language(text) == expected


def test_german_digits_are_never_read_with_english_rules():
    result = normalization.normalize_text("Der Preis ist 25 Euro und nicht mehr.")
    assert result.language == "de"
    assert result.text == "Der Preis ist fünfundzwanzig Euro und nicht mehr."


def test_the_requested_language_wins_over_detection():
    assert normalization.normalize_text("42", "fr").text == "quarante-deux."
    assert normalization.normalize_text("42", "pt-BR").language == "pt"


def test_unknown_language_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="language='xx'.*expected one of zh, en"):
        normalization.normalize_text("hello", "xx")


def test_text_with_nothing_speakable_is_refused():
    with pytest.raises(ValueError, match="nothing to speak"):
        normalization.normalize_text("🎉🎉 ``` ```")


def test_both_stages_off_leaves_the_text_unchanged():
    written = "**Bold** costs $5\n- item"
    assert normalization.normalize_text(written, cleanup=False, verbalize=False).text == written


def test_normalizing_needs_no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("text normalization tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    wetext = import_module("text_wetext")
    monkeypatch.setattr(wetext, "_NORMALIZERS", {})  # rebuild both grammars under the guard
    assert normalization.normalize_text("It is 5 pm.", "en").text == "It is five PM."
    assert normalization.normalize_text("5点", "zh").text == "五点。"


def test_parse_number_reads_each_notation():
    assert numbers.parse_number("1.234,5", decimal_comma=True) == ("1234", "5")
    assert numbers.parse_number("1,234.5", decimal_comma=False) == ("1234", "5")


def _request(**overrides):
    """build_request with `inference`'s defaults (no model needed: normalization runs before anything loads)."""
    import inspect

    synthesis = import_module("synthesis")
    parameters = inspect.signature(synthesis.SynthesisMixin.inference).parameters
    arguments = {name: p.default for name, p in parameters.items() if name != "self"}
    arguments.update(text="**Total:** $20.50", output_audio_path=None, progress=False)
    arguments.update(overrides)
    return synthesis.build_request(**arguments)


def test_inference_speaks_the_text_as_given_unless_asked():
    assert _request().text == "**Total:** $20.50"


def test_inference_normalizes_when_asked_and_keeps_the_written_text():
    request = _request(normalize=True)
    assert request.text == "Total: twenty dollars and fifty cents."
    assert request.written_text == "**Total:** $20.50"


def test_each_stage_can_be_turned_off_alone():
    options = normalization.TextOptions
    # Without the cleanup, WeTextProcessing reads the markdown aloud: why the cleanup runs first.
    assert _request(normalize=options(cleanup=False)).text == ("asterisk asterisk Total:asterisk asterisk twenty "
                                                               "dollars and fifty cents")
    assert _request(normalize=options(verbalize=False)).text == "Total: $20.50."


def test_a_bad_language_is_refused_before_anything_loads():
    with pytest.raises(ValueError, match="language='klingon'"):
        _request(normalize=True, language="klingon")


# Properties over generated texts (hypothesis).
from hypothesis import given, settings, strategies as st  # noqa: E402

_WORDS = st.sampled_from(["hello", "world", "Preis", "coûte", "价格", "**bold**", "# Title", "- item", "`code`",
                          "[link](https://x.org)", "🎉", "!!!", "\n", "\n\n", "3:30", "$20.50", "15%", "1,234", "5 kg"])


@settings(max_examples=60, deadline=None)
@given(st.lists(_WORDS, min_size=1, max_size=12))
def test_cleaned_text_is_one_line_without_markup(pieces):
    cleaned = cleanup.clean_text(" ".join(pieces))
    assert "\n" not in cleaned and "**" not in cleaned and "`" not in cleaned and "](" not in cleaned
    assert not any(marker in cleaned for marker in ("# ", "🎉", "!!"))
    assert cleaned == "" or cleaned[-1] in cleanup.LINE_END_MARKS


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(numbers.SUPPORTED_LANGUAGES), st.integers(0, 10**9), st.integers(0, 99))
def test_every_written_number_becomes_words(lang, integer, cents):
    comma = numbers.WORDS[lang].decimal_comma
    grouped = f"{integer:,}".replace(",", "." if comma else ",")
    written = f"{grouped}{',' if comma else '.'}{cents:02d}"
    spoken = numbers.NumberSpeller(lang).spell(f"x {written} x")
    assert not any(char.isdigit() for char in spoken), (written, spoken)


@settings(max_examples=100, deadline=None)
@given(st.text(min_size=1, max_size=80))
def test_any_text_gets_a_model_language(text):
    assert language.detect_language(text) in language.LANGUAGES


@pytest.mark.parametrize("lang, text", [
    ("en", "Call me at 3:30 pm on May 5th. Dr. Smith paid $20 for 5 kg! Is NASA open? It is 25°C; see you."),
    ("en", "Plain words only here. Then 15% more. And plain again."),
    ("zh", "今天是2024年3月5日。价格是20.5元！增长了15%？下午三点开会。"),
])
def test_sentence_by_sentence_gives_the_whole_texts_normalization(lang, text):
    wetext = import_module("text_wetext")
    whole = wetext.normalizer(lang).normalize(text)
    if lang == "zh":  # a skipped sentence keeps its full-width "。", which the grammar would write as "."
        assert wetext.full_width_punctuation(wetext.by_sentence(lang, text)) == wetext.full_width_punctuation(whole)
    else:
        assert wetext.by_sentence(lang, text) == whole

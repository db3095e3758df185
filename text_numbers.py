"""Numbers, times, currencies, percentages and units as words, for the model's languages other than zh / en.

num2words (a well-kept library, offline) spells cardinals; everything around them is ours, in one table per language
(`WORDS`): the decimal, minus and percent words, the currency and unit names and the clock pattern. We do not use
num2words for decimals, negatives or currencies because of slips measured on 0.5.14: Italian drops decimals (3.14 ->
"tre"), Persian reads 0.05 as "half", Arabic puts a comma into decimals and names every currency "riyal", Polish and
Czech fail on negatives, and several languages have no currency support. Here a decimal is read as
"<integer> <decimal word> <each digit>" ("drei Komma eins vier"), which every language understands.

Numbers are read in the language's own notation: languages with a decimal comma read "1.234,5" as 1234.5 and "3,5"
as 3.5; the others read "1,234.5". Greek has no num2words speller: its text keeps its digits. Ordinals and dates are
read as their cardinals (a year is a cardinal in these languages), except a German day before a month name
("am 5. Mai" -> "am fünften Mai").
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

from num2words import num2words

# Currency symbols and ISO codes -> the key of a currency in LanguageWords.currencies.
CURRENCY_SYMBOLS = {"€": "EUR", "$": "USD", "£": "GBP", "₽": "RUB", "₪": "ILS", "¥": "JPY", "₩": "KRW", "EUR": "EUR",
                    "USD": "USD", "GBP": "GBP"}
# German month names: a day number before one is an ordinal (NumberSpeller._date_rules).
GERMAN_MONTHS = "Januar|Februar|März|April|Mai|Juni|Juli|August|September|Oktober|November|Dezember"
# Units, longest first where one abbreviation starts another.
UNIT_SYMBOLS = ("km/h", "°C", "km", "kg", "cm", "mm", "ml", "m", "g", "l")


@dataclass(frozen=True)
class LanguageWords:
    """The words one language needs around its numbers (names are (singular, plural))."""

    decimal: str
    minus: str
    percent: str  # "{n}" is the number
    clock: str  # "{h}" hours, "{m}" minutes
    decimal_comma: bool = True
    joiner: str = " "
    currencies: dict = field(default_factory=dict)
    units: dict = field(default_factory=dict)


def _names(text: str) -> dict:
    """'EUR=euro/euros;USD=...' -> {"EUR": ("euro", "euros"), ...}; a name without '/' does not inflect."""
    table = {}
    for item in text.split(";"):
        key, _, names = item.strip().partition("=")
        singular, _, plural = names.partition("/")
        table[key] = (singular, plural or singular)
    return table


WORDS = {
    "de": LanguageWords("Komma", "minus", "{n} Prozent", "{h} Uhr {m}", currencies=_names(
        "EUR=Euro;USD=Dollar;GBP=Pfund;RUB=Rubel;ILS=Schekel;JPY=Yen;KRW=Won"), units=_names(
        "km/h=Kilometer pro Stunde;°C=Grad;km=Kilometer;kg=Kilogramm;cm=Zentimeter;mm=Millimeter;ml=Milliliter;"
        "m=Meter;g=Gramm;l=Liter")),
    "es": LanguageWords("coma", "menos", "{n} por ciento", "{h} y {m}", currencies=_names(
        "EUR=euro/euros;USD=dólar/dólares;GBP=libra/libras;RUB=rublo/rublos;JPY=yen/yenes;KRW=won/wones"),
        units=_names("km/h=kilómetros por hora;°C=grado/grados;km=kilómetro/kilómetros;kg=kilogramo/kilogramos;"
                     "cm=centímetro/centímetros;mm=milímetro/milímetros;ml=mililitro/mililitros;m=metro/metros;"
                     "g=gramo/gramos;l=litro/litros")),
    "fr": LanguageWords("virgule", "moins", "{n} pour cent", "{h} heures {m}", currencies=_names(
        "EUR=euro/euros;USD=dollar/dollars;GBP=livre/livres;RUB=rouble/roubles;JPY=yen/yens;KRW=won/wons"),
        units=_names("km/h=kilomètres par heure;°C=degré/degrés;km=kilomètre/kilomètres;kg=kilogramme/kilogrammes;"
                     "cm=centimètre/centimètres;mm=millimètre/millimètres;ml=millilitre/millilitres;m=mètre/mètres;"
                     "g=gramme/grammes;l=litre/litres")),
    "it": LanguageWords("virgola", "meno", "{n} per cento", "{h} e {m}", currencies=_names(
        "EUR=euro;USD=dollaro/dollari;GBP=sterlina/sterline;RUB=rublo/rubli;JPY=yen;KRW=won"),
        units=_names("km/h=chilometri orari;°C=grado/gradi;km=chilometro/chilometri;kg=chilogrammo/chilogrammi;"
                     "cm=centimetro/centimetri;mm=millimetro/millimetri;ml=millilitro/millilitri;m=metro/metri;"
                     "g=grammo/grammi;l=litro/litri")),
    "pt": LanguageWords("vírgula", "menos", "{n} por cento", "{h} e {m}", currencies=_names(
        "EUR=euro/euros;USD=dólar/dólares;GBP=libra/libras;RUB=rublo/rublos;JPY=iene/ienes;KRW=won/wons"),
        units=_names("km/h=quilômetros por hora;°C=grau/graus;km=quilômetro/quilômetros;kg=quilograma/quilogramas;"
                     "cm=centímetro/centímetros;mm=milímetro/milímetros;ml=mililitro/mililitros;m=metro/metros;"
                     "g=grama/gramas;l=litro/litros")),
    "pl": LanguageWords("przecinek", "minus", "{n} procent", "{h} {m}", currencies=_names(
        "EUR=euro;USD=dolar/dolarów;GBP=funt/funtów;RUB=rubel/rubli;JPY=jen/jenów;KRW=won/wonów")),
    "ru": LanguageWords("запятая", "минус", "{n} процентов", "{h} {m}", currencies=_names(
        "EUR=евро;USD=доллар/долларов;GBP=фунт/фунтов;RUB=рубль/рублей;JPY=иена/иен;KRW=вона/вон")),
    "cs": LanguageWords("celá", "mínus", "{n} procent", "{h} {m}", currencies=_names(
        "EUR=euro/eur;USD=dolar/dolarů;GBP=libra/liber;RUB=rubl/rublů;JPY=jen/jenů")),
    "da": LanguageWords("komma", "minus", "{n} procent", "{h} {m}", currencies=_names(
        "EUR=euro;USD=dollar/dollars;GBP=pund;JPY=yen")),
    "sv": LanguageWords("komma", "minus", "{n} procent", "{h} {m}", currencies=_names(
        "EUR=euro;USD=dollar;GBP=pund;JPY=yen")),
    "hu": LanguageWords("egész", "mínusz", "{n} százalék", "{h} óra {m} perc", currencies=_names(
        "EUR=euró;USD=dollár;GBP=font;JPY=jen")),
    "tr": LanguageWords("virgül", "eksi", "yüzde {n}", "{h} {m}", currencies=_names(
        "EUR=euro;USD=dolar;GBP=sterlin;JPY=yen")),
    "he": LanguageWords("נקודה", "מינוס", "{n} אחוז", "{h} ו{m}", decimal_comma=False, currencies=_names(
        "EUR=אירו;USD=דולר;GBP=פאונד;ILS=שקל/שקלים")),
    "ar": LanguageWords("فاصلة", "سالب", "{n} بالمئة", "{h} و{m}", decimal_comma=False, currencies=_names(
        "EUR=يورو;USD=دولار;GBP=جنيه")),
    "fa": LanguageWords("ممیز", "منفی", "{n} درصد", "{h} و {m}", decimal_comma=False, currencies=_names(
        "EUR=یورو;USD=دلار;GBP=پوند")),
    "ko": LanguageWords("점", "마이너스", "{n} 퍼센트", "{h} 시 {m} 분", decimal_comma=False, currencies=_names(
        "EUR=유로;USD=달러;GBP=파운드;KRW=원;JPY=엔")),
    "ja": LanguageWords("点", "マイナス", "{n}パーセント", "{h}時{m}分", decimal_comma=False, joiner="",
                        currencies=_names("EUR=ユーロ;USD=ドル;GBP=ポンド;JPY=円")),
}
SUPPORTED_LANGUAGES = tuple(WORDS)


def number_pattern(decimal_comma: bool) -> str:
    """A regex for one unsigned number in a notation: grouped thousands or plain digits, then optional decimals."""
    group, point = (r"[.\u00a0\u202f ]", ",") if decimal_comma else (",", r"\.")
    return rf"(?:\d{{1,3}}(?:{group}\d{{3}})+|\d+)(?:{point}\d+)?(?!\d)"


def parse_number(written: str, decimal_comma: bool) -> tuple[str, str]:
    """'1.234,5' (decimal comma) -> ('1234', '5'): the integer and the decimal digits of a written number."""
    point = "," if decimal_comma else "."
    integer, _, decimals = written.partition(point)
    return re.sub(r"\D", "", integer), decimals


class NumberSpeller:
    """Spells the numbers of one language (see the module docstring); `spell(text)` rewrites a whole text."""

    def __init__(self, language: str):
        if language not in WORDS:
            raise ValueError(f"language={language!r} has no number rules here; expected one of "
                             f"{', '.join(SUPPORTED_LANGUAGES)}")
        self.language, self.words = language, WORDS[language]
        number = number_pattern(self.words.decimal_comma)
        symbols = "|".join(re.escape(symbol) for symbol in CURRENCY_SYMBOLS)
        units = "|".join(re.escape(unit) for unit in UNIT_SYMBOLS)
        signed = rf"(?:(?<![\w.,])[-−](?=\d))?{number}"
        self.rules: list[tuple[re.Pattern, Callable]] = [*self._date_rules(),
            (re.compile(r"(?<![\d:])([01]?\d|2[0-3]):([0-5]\d)(?![\d:])"), self._clock),
            (re.compile(rf"(?P<symbol>{symbols})\s?(?P<number>{number})"), self._currency),
            (re.compile(rf"(?P<number>{number})\s?(?P<symbol>{symbols})(?!\w)"), self._currency),
            (re.compile(rf"(?P<number>{signed})\s?%"), self._percent),
            (re.compile(rf"%\s?(?P<number>{signed})"), self._percent),
            (re.compile(rf"(?P<number>{signed})\s?(?P<unit>{units})(?![\w/])"), self._unit),
            (re.compile(signed), lambda match: self.number(match.group(0))),
        ]

    def _date_rules(self) -> list:
        """German "am 5. Mai": a day before a month name is an ordinal, in the dative of "am" / "vom" ("fünften")."""
        if self.language != "de":
            return []
        day = re.compile(rf"(?<![\d.])([12]?\d|3[01])\.\s(?=(?:{GERMAN_MONTHS})\b)")
        return [(day, lambda match: num2words(int(match.group(1)), lang="de", to="ordinal") + "n ")]

    def spell(self, text: str) -> str:
        """`text` with every number the rules know turned into words, rule by rule: German dates, clock times,
        currencies, percentages, units, then the remaining numbers."""
        for pattern, replace in self.rules:
            text = pattern.sub(replace, text)
        return text

    def cardinal(self, value: int) -> str:
        return num2words(value, lang=self.language)

    def number(self, written: str) -> str:
        """A written number, maybe signed, maybe with decimals, as words."""
        sign = ""
        if written[0] in "-−":
            sign, written = self.words.minus + self.words.joiner, written[1:]
        integer, decimals = parse_number(written, self.words.decimal_comma)
        words = self.cardinal(int(integer))
        if decimals:
            digits = self.words.joiner.join(self.cardinal(int(digit)) for digit in decimals)
            words = self.words.joiner.join((words, self.words.decimal, digits))
        return sign + words

    def _clock(self, match: re.Match) -> str:
        hours, minutes = int(match.group(1)), int(match.group(2))
        spoken = self.words.clock.format(h=self.cardinal(hours), m=self.cardinal(minutes) if minutes else "")
        return spoken.strip()

    def _percent(self, match: re.Match) -> str:
        return self.words.percent.format(n=self.number(match.group("number")))

    def _unit(self, match: re.Match) -> str:
        names = self.words.units.get(match.group("unit"))
        if names is None:
            return match.group(0)
        return self._amount(match.group("number"), names)

    def _currency(self, match: re.Match) -> str:
        names = self.words.currencies.get(CURRENCY_SYMBOLS[match.group("symbol")])
        if names is None:
            return match.group(0)
        integer, decimals = parse_number(match.group("number"), self.words.decimal_comma)
        spoken = self._amount(integer, names)
        cents = int(decimals.ljust(2, "0")[:2]) if decimals else 0
        return spoken + (self.words.joiner + self.cardinal(cents) if cents else "")

    def _amount(self, written: str, names: tuple) -> str:
        """'<number> <name>', singular for exactly one."""
        one = re.fullmatch(r"0*1", written) is not None
        return self.number(written) + self.words.joiner + (names[0] if one else names[1])


__all__ = ["CURRENCY_SYMBOLS", "LanguageWords", "NumberSpeller", "SUPPORTED_LANGUAGES", "UNIT_SYMBOLS", "WORDS",
           "number_pattern", "parse_number"]

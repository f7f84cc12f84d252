"""Forms of the portal: document metadata and ask filters."""
from __future__ import annotations

from django import forms
from django.utils.translation import gettext_lazy as _

VISIBILITY_CHOICES = [("private", _("Private")), ("group", _("My groups")), ("firm", _("Firm"))]
DOC_TYPES = ["", "10-K", "10-Q", "8-K", "earnings", "annual report", "research note", "presentation", "other"]


class MetadataForm(forms.Form):
    """Metadata an analyst may give before or after upload; blank fields are left to extraction."""

    title = forms.CharField(label=_("Title"), max_length=500, required=False)
    company = forms.CharField(label=_("Company"), max_length=200, required=False)
    ticker = forms.CharField(label=_("Ticker"), max_length=20, required=False)
    report_date = forms.DateField(label=_("Report date"), required=False, widget=forms.DateInput(attrs={"type": "date"}))
    doc_type = forms.CharField(label=_("Type"), max_length=40, required=False)
    visibility = forms.ChoiceField(label=_("Visibility"), choices=VISIBILITY_CHOICES, initial="private",
                                   required=False)
    group = forms.IntegerField(label=_("Group"), required=False)

    def __init__(self, *args, user=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.user = user

    def clean(self):
        data = super().clean()
        data["visibility"] = data.get("visibility") or "private"
        if data.get("visibility") == "group":
            groups = self.user.groups.all() if self.user else []
            gid = data.get("group")
            if gid is None and len(groups) == 1:
                gid = groups[0].pk
            if gid is None or not any(g.pk == gid for g in groups):
                raise forms.ValidationError(_("Choose one of your groups for group visibility."))
            data["group"] = gid
        else:
            data["group"] = None
        return data

    def metadata(self) -> dict:
        """Only the fields the user filled in."""
        keys = ("title", "company", "ticker", "report_date", "doc_type")
        return {k: self.cleaned_data[k] for k in keys if self.cleaned_data.get(k) not in (None, "")}


def form_errors(form: forms.Form) -> str:
    """All errors of a form in one line, each named by its field."""
    return "; ".join((f"{k}: " if k != "__all__" else "") + " ".join(v) for k, v in form.errors.items())


class FilterForm(forms.Form):
    """Optional filters of a question."""

    company = forms.CharField(label=_("Company"), max_length=200, required=False)
    date_from = forms.DateField(label=_("From"), required=False, widget=forms.DateInput(attrs={"type": "date"}))
    date_to = forms.DateField(label=_("To"), required=False, widget=forms.DateInput(attrs={"type": "date"}))
    doc_type = forms.CharField(label=_("Type"), max_length=40, required=False)
    language = forms.ChoiceField(label=_("Language"), required=False,
                                 choices=[("", _("Any")), ("en", "English"), ("zh", "中文")])

    def filters(self) -> dict:
        return {k: v for k, v in self.cleaned_data.items() if v not in (None, "")}

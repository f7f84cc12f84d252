// Ask: POST the question, read the server-sent events as they stream, render verified citations as links.
(function () {
  "use strict";
  const KD = window.KD, form = document.getElementById("ask-form"), turns = document.getElementById("turns");
  const csrf = form.querySelector("[name=csrfmiddlewaretoken]").value;

  function renderCited(el, text, citations) {
    const byN = {};
    (citations || []).forEach((c) => { byN[c.n] = c; });
    el.textContent = "";
    const re = /\[(\d+)\]/g;
    let last = 0, m;
    while ((m = re.exec(text)) !== null) {
      el.appendChild(document.createTextNode(text.slice(last, m.index)));
      const c = byN[+m[1]];
      if (c) {
        const a = document.createElement("a");
        a.className = "cite"; a.href = c.url; a.textContent = "[" + c.n + "]";
        a.title = c.title + " " + KD.t.page + " " + (c.page_start || "");
        el.appendChild(a);
      }
      last = re.lastIndex;
    }
    el.appendChild(document.createTextNode(text.slice(last)));
  }

  function renderSources(box, sources) {
    box.textContent = "";
    if (!sources.length) return;
    const h = document.createElement("div"); h.className = "sources-title"; h.textContent = KD.t.sources; box.appendChild(h);
    const ol = document.createElement("ol");
    sources.forEach((s) => {
      const li = document.createElement("li"), a = document.createElement("a");
      a.href = s.url; a.textContent = s.title + " — " + KD.t.page + " " + (s.page_start || "?");
      li.appendChild(a); ol.appendChild(li);
    });
    box.appendChild(ol);
  }

  function wireFeedback(f) {
    f.querySelectorAll("button.thumb").forEach((b) => b.addEventListener("click", () => {
      const data = new FormData(f); data.append("rating", b.value);
      fetch(KD.feedbackBase + f.dataset.messageId + "/feedback/", {method: "POST", body: data, headers: {"X-CSRFToken": csrf}, credentials: "same-origin"})
        .then((r) => r.json()).then((j) => { f.querySelector(".feedback-status").textContent = j.ok ? KD.t.thanks : (j.error || ""); });
    }));
  }
  document.querySelectorAll("form.feedback").forEach(wireFeedback);

  function handle(ev, parts) {
    if (ev.event === "sources") renderSources(parts.sources, ev.sources);
    else if (ev.event === "token") { parts.raw += ev.text; parts.text.textContent = parts.raw; }
    else if (ev.event === "replace") {
      parts.raw = ev.text; parts.text.textContent = ev.text;
      const note = document.createElement("div"); note.className = "muted note";
      note.textContent = ev.reason === "abstained" ? KD.t.abstained : KD.t.unverified;
      parts.box.insertBefore(note, parts.sources);
    }
    else if (ev.event === "error") { parts.text.textContent = ev.error; parts.box.classList.add("error"); }
    else if (ev.event === "done") {
      renderCited(parts.text, ev.text, ev.citations);
      parts.box.classList.add("done");
      if (ev.not_found) parts.box.classList.add("not-found");
      if (ev.conversation_id) {
        form.querySelector("[name=conversation]").value = ev.conversation_id;
        history.replaceState(null, "", KD.conversationBase + ev.conversation_id + "/");
      }
      if (ev.message_id) {
        const fb = document.getElementById("feedback-template").content.firstElementChild.cloneNode(true);
        fb.dataset.messageId = ev.message_id; fb.querySelector("[name=csrfmiddlewaretoken]").value = csrf;
        parts.box.appendChild(fb); wireFeedback(fb);
      }
    }
  }

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const data = new FormData(form), q = data.get("question");
    if (!q.trim()) return;
    const qd = document.createElement("div"); qd.className = "turn question"; qd.textContent = q; turns.appendChild(qd);
    const box = document.createElement("div"); box.className = "turn answer streaming";
    const text = document.createElement("div"); text.className = "answer-text";
    const sources = document.createElement("div"); sources.className = "sources";
    box.appendChild(text); box.appendChild(sources); turns.appendChild(box);
    form.querySelector("textarea").value = "";
    const parts = {box, text, sources, raw: ""};
    const resp = await fetch(form.action, {method: "POST", body: data, headers: {"X-CSRFToken": csrf}, credentials: "same-origin"});
    if (!resp.ok) { text.textContent = await resp.text(); box.classList.add("error"); return; }
    const reader = resp.body.getReader(), dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buf += dec.decode(value, {stream: true});
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, cut); buf = buf.slice(cut + 2);
        const line = block.split("\n").find((l) => l.startsWith("data: "));
        if (line) handle(JSON.parse(line.slice(6)), parts);
      }
    }
    box.classList.remove("streaming");
  });
})();

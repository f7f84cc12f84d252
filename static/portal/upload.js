// Drag-and-drop upload: one XHR per file with progress, then polling of pipeline status.
(function () {
  "use strict";
  const KD = window.KD, zone = document.getElementById("drop-zone"), input = document.getElementById("file-input");
  const form = document.getElementById("upload-form"), tbody = document.querySelector("#upload-table tbody");
  const csrf = form.querySelector("[name=csrfmiddlewaretoken]").value;
  const rows = {};  // document id -> row
  const TERMINAL = ["indexed", "failed"];

  function cell(tr, i) { return tr.children[i]; }
  function text(el, s) { el.textContent = s; }

  function addRow(name) {
    const tr = document.createElement("tr");
    tr.className = "upload-row";
    tr.innerHTML = "<td class='name'></td><td><progress max='100' value='0'></progress> <span class='pct'></span></td>" +
                   "<td class='status'></td><td class='actions'></td>";
    text(cell(tr, 0), name);
    tr.dataset.filename = name;
    tbody.appendChild(tr);
    return tr;
  }

  function showStatus(tr, doc) {
    const st = cell(tr, 2);
    st.textContent = "";
    const badge = document.createElement("span");
    badge.className = "badge status-" + doc.status;
    badge.textContent = doc.status + (TERMINAL.includes(doc.status) ? "" : " " + (doc.progress || 0) + "%");
    st.appendChild(badge);
    tr.dataset.status = doc.status;
    if (doc.status === "failed" && doc.status_reason) {
      const why = document.createElement("div");
      why.className = "reason"; why.textContent = doc.status_reason; st.appendChild(why);
    }
    const act = cell(tr, 3);
    act.textContent = "";
    const open = document.createElement("a");
    open.href = doc.url; open.textContent = KD.t.open; act.appendChild(open);
    if (doc.status === "failed") {
      const b = document.createElement("button");
      b.type = "button"; b.className = "retry"; b.textContent = KD.t.retry;
      b.onclick = () => retry(doc.id, tr);
      act.appendChild(b);
    }
  }

  function upload(file) {
    const tr = addRow(file.name), bar = tr.querySelector("progress"), pct = tr.querySelector(".pct");
    const data = new FormData(form);
    data.delete("csrfmiddlewaretoken");
    data.append("file", file, file.name);
    const xhr = new XMLHttpRequest();
    xhr.open("POST", KD.apiDocuments);
    xhr.setRequestHeader("X-CSRFToken", csrf);
    xhr.upload.onprogress = (e) => { if (e.lengthComputable) { bar.value = Math.round(100 * e.loaded / e.total); text(pct, bar.value + "%"); } };
    xhr.onload = () => {
      let body = {};
      try { body = JSON.parse(xhr.responseText); } catch (e) { body = {error: xhr.statusText}; }
      bar.value = 100; text(pct, KD.t.uploaded);
      if (xhr.status >= 400) {
        tr.dataset.status = "rejected";
        const st = cell(tr, 2); st.textContent = ""; const err = document.createElement("span");
        err.className = "error"; err.textContent = body.error || xhr.statusText; st.appendChild(err);
        return;
      }
      if (body.duplicate_of) {
        tr.dataset.status = "duplicate";
        const st = cell(tr, 2); st.textContent = "";
        const msg = document.createElement("span"); msg.className = "duplicate"; msg.textContent = body.message;
        st.appendChild(msg);
        if (body.duplicate_of.url) { const a = document.createElement("a"); a.href = body.duplicate_of.url; a.textContent = " #" + body.duplicate_of.id; st.appendChild(a); }
        return;
      }
      rows[body.id] = tr;
      tr.dataset.documentId = body.id;
      showStatus(tr, body);
    };
    xhr.onerror = () => { const st = cell(tr, 2); st.textContent = "network error"; };
    xhr.send(data);
  }

  function retry(id, tr) {
    fetch(KD.retryBase + id + "/retry/", {method: "POST", headers: {"X-CSRFToken": csrf}, credentials: "same-origin"})
      .then((r) => r.json()).then((doc) => { if (doc.id) showStatus(tr, doc); });
  }

  function poll() {
    const ids = Object.keys(rows).filter((id) => !TERMINAL.includes(rows[id].dataset.status));
    if (ids.length) {
      fetch(KD.apiStatus + "?ids=" + ids.join(","), {credentials: "same-origin"})
        .then((r) => r.json()).then((body) => (body.documents || []).forEach((d) => rows[d.id] && showStatus(rows[d.id], d)))
        .catch(() => {});
    }
    setTimeout(poll, 1000);
  }

  function handle(files) { Array.from(files).forEach(upload); }
  ["dragenter", "dragover"].forEach((t) => zone.addEventListener(t, (e) => { e.preventDefault(); zone.classList.add("over"); }));
  ["dragleave", "drop"].forEach((t) => zone.addEventListener(t, (e) => { e.preventDefault(); zone.classList.remove("over"); }));
  zone.addEventListener("drop", (e) => handle(e.dataTransfer.files));
  input.addEventListener("change", () => { handle(input.files); input.value = ""; });
  poll();
})();

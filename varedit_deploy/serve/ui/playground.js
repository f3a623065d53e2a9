// The playground: one photo and one instruction to POST /v1/images/edits with stream=true; the
// previews replace each other as their events arrive, then the final image, its download link and
// the timing the server reports. Every URL is relative to the page, which names no other host.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const form = $("edit-form"), photo = $("photo"), prompt = $("prompt"), previews = $("previews");
  const keyField = $("key-field"), apiKey = $("api-key"), button = $("edit"), error = $("error");
  const source = $("source"), sourceSize = $("source-size"), dropZone = $("drop-zone");
  const result = $("result"), resultStatus = $("result-status"), resultEmpty = $("result-empty");
  const download = $("download"), timing = $("timing"), serverNote = $("server-note");
  const sampling = [["cfg", $("cfg")], ["tau", $("tau")], ["seed", $("seed")]];
  let chosen = null; // {blob, name}: what Edit uploads

  function authorization() {
    const key = apiKey.value.trim();
    return key ? { Authorization: `Bearer ${key}` } : {};
  }

  function showError(message) {
    error.textContent = message;
    error.hidden = false;
  }

  function replaceUrl(element, attribute, blob) {
    const old = element.getAttribute(attribute);
    if (old && old.startsWith("blob:")) URL.revokeObjectURL(old);
    element.setAttribute(attribute, URL.createObjectURL(blob));
  }

  function choose(blob, name) {
    chosen = { blob, name };
    sourceSize.textContent = "";
    replaceUrl(source, "src", blob);
  }

  source.addEventListener("load", () => {
    sourceSize.textContent = `${chosen.name}, ${source.naturalWidth}×${source.naturalHeight} px`;
  });
  source.addEventListener("error", () => {
    sourceSize.textContent = "(this browser cannot show the file; the server will say what it makes of it)";
  });
  photo.addEventListener("change", () => {
    if (photo.files.length) choose(photo.files[0], photo.files[0].name);
  });
  dropZone.addEventListener("dragover", (event) => {
    event.preventDefault();
    dropZone.classList.add("dragging");
  });
  dropZone.addEventListener("dragleave", () => dropZone.classList.remove("dragging"));
  dropZone.addEventListener("drop", (event) => {
    event.preventDefault();
    dropZone.classList.remove("dragging");
    const file = event.dataTransfer.files[0];
    if (file) choose(file, file.name);
  });

  function askForKey() {
    keyField.hidden = false;
    apiKey.focus();
  }

  async function describeServer() {
    try {
      const response = await fetch("v1/models", { headers: authorization() });
      if (response.status === 401) {
        serverNote.textContent = "This server needs an API key: type it below.";
        keyField.hidden = false;
      } else if (response.ok) {
        const models = await response.json();
        serverNote.textContent = `Model ${models.data[0].id}. This page sends POST /v1/images/edits ` +
          "to this server, like any client.";
      }
    } catch (failure) {
      serverNote.textContent = `The server did not answer (${failure.message}).`;
    }
  }

  function imageBlob(event) {
    const bytes = Uint8Array.from(atob(event.b64_json), (c) => c.charCodeAt(0));
    return new Blob([bytes], { type: `image/${event.output_format}` });
  }

  // Resolves once the image is decoded, so a preview is on screen before the next event replaces it
  // (events that arrive in one chunk would otherwise skip straight to the last).
  function showImage(event, kind, label) {
    result.dataset.kind = kind;
    result.dataset.index = kind === "preview" ? String(event.partial_image_index) : "";
    result.alt = label;
    replaceUrl(result, "src", imageBlob(event));
    result.hidden = false;
    resultEmpty.hidden = true;
    resultStatus.textContent = label;
    return result.decode().catch(() => {});
  }

  function describeTiming(serverTiming, firstPreview, final) {
    const parts = (serverTiming || "").split(",").map((part) => part.trim().split(";dur="))
      .filter((part) => part.length === 2).map(([name, ms]) => `${name} ${Number(ms).toFixed(0)} ms`);
    const seen = firstPreview === null ? "" : `first preview after ${(firstPreview / 1000).toFixed(2)} s, `;
    return `Server: ${parts.join(" · ") || "no timing reported"}. In this browser: ${seen}` +
      `final image after ${(final / 1000).toFixed(2)} s.`;
  }

  async function readEvents(response, started, wanted) {
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "", firstPreview = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = block.split("\n").filter((line) => line.startsWith("data: "))
          .map((line) => line.slice(6)).join("\n");
        if (!data) continue;
        const event = JSON.parse(data);
        if (event.type === "image_edit.partial_image") {
          if (firstPreview === null) firstPreview = performance.now() - started;
          await showImage(event, "preview", `preview ${event.partial_image_index + 1} of ${wanted}`);
        } else if (event.type === "image_edit.completed") {
          showImage(event, "final", `the edited photo (${event.size})`);
          replaceUrl(download, "href", imageBlob(event));
          download.download = `edited.${event.output_format === "jpeg" ? "jpg" : event.output_format}`;
          download.hidden = false;
          timing.textContent = describeTiming(event.server_timing, firstPreview, performance.now() - started);
          return;
        } else if (event.error) {
          showError(event.error.message);
          return;
        }
      }
    }
    showError("The stream ended before the final image arrived.");
  }

  async function showRefusal(response) {
    let message = `${response.status} ${response.statusText}`;
    try {
      message = (await response.json()).error.message;
    } catch (ignored) {
      // not OpenAI's error shape (a proxy in between): the status line is all there is
    }
    showError(message);
    if (response.status === 401) askForKey();
  }

  form.addEventListener("submit", async (submitted) => {
    submitted.preventDefault();
    error.hidden = true;
    if (!chosen) {
      showError("Choose a photo first.");
      return;
    }
    const body = new FormData();
    body.append("image", chosen.blob, chosen.name);
    body.append("prompt", prompt.value);
    body.append("stream", "true");
    body.append("partial_images", previews.value);
    for (const [name, input] of sampling) {
      if (input.value.trim() !== "") body.append(name, input.value.trim());
    }
    button.disabled = true;
    download.hidden = true;
    timing.textContent = "";
    resultStatus.textContent = "waiting for the server…";
    const started = performance.now();
    try {
      const response = await fetch("v1/images/edits", { method: "POST", body, headers: authorization() });
      if (response.ok) await readEvents(response, started, Number(previews.value));
      else await showRefusal(response);
    } catch (failure) {
      showError(`The request failed: ${failure.message}`);
    } finally {
      button.disabled = false;
      if (resultStatus.textContent === "waiting for the server…") resultStatus.textContent = "";
    }
  });

  fetch("ui/sample.jpg").then((response) => response.blob()).then((blob) => {
    if (!chosen) choose(blob, "sample.jpg");
  });
  describeServer();
})();

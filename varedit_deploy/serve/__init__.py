"""`varedit-deploy serve`: an OpenAI-style image-edit server (`POST /v1/images/edits`).

Split like text-generation-inference and vLLM's OpenAI entry point: `protocol.py` (wire format,
validation, OpenAI-shaped errors) and `uploads.py` (image bytes in and out) never touch
tensors; `scheduler.py` queues edits and hands batches to `EditPipeline.edit_batch`; the
pipeline never sees an HTTP request. `app.py` wires the routes, `page.py` serves the playground
page (GET /), `server.py` runs uvicorn.
Nothing here imports torch.
"""

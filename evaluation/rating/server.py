"""The rating web app (Flask): each rater's link, `/r/<token>`, shows their next image and questions.

    GET  /r/<token>                  the rater's first unanswered image, or "done"
    GET  /r/<token>/image/<opaque>   an image of that rater's queue, under its opaque id
    POST /r/<token>/answer/<opaque>  the answers to it (one transaction), then back to the page

A token sees only its own queue and progress: an opaque id from another rater's queue, an unknown
token or any other path is a 404, and no page lists raters or answers. Nothing served tells a
real image from a generated one: the page is the same template for every image (its opaque id,
the prompt when the design shows it, the finding asked about and the progress are all that
change) and the images are re-encoded PNGs of one size and mode (`study.blinded_png`).
"""

from __future__ import annotations

from flask import Flask, Response, abort, redirect, request

from .study import Study

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Image rating</title>
<style>
body { font-family: sans-serif; max-width: 60em; margin: 1em auto; padding: 0 1em; }
img { max-width: 100%; height: auto; image-rendering: auto; background: #000; }
fieldset { margin: 0.6em 0; } .error { color: #b00; } .progress { color: #555; }
</style></head><body>
{% if item is none %}
<h1>Thank you</h1>
<p id="done">All {{ queued }} images are rated, {{ rater }}: thank you. You may close this page.</p>
{% else %}
<p class="progress" id="progress">Image {{ answered + 1 }} of {{ queued }} for {{ rater }}.
Your answers are saved one image at a time: you may close this page and come back to this link
to go on where you stopped.</p>
{% if error %}<p class="error" id="error">{{ error }}</p>{% endif %}
<img id="image" src="{{ image_url }}" width="{{ size }}" height="{{ size }}" alt="image to rate">
{% if prompt is not none %}<p id="prompt">Prompt: {{ prompt }}</p>{% endif %}
<form id="answers" method="post" action="{{ answer_url }}">
{% if "turing" in questions %}<fieldset><legend>Is this image real or synthetic?</legend>
<label><input type="radio" name="turing" value="real" required> Real</label>
<label><input type="radio" name="turing" value="synthetic"> Synthetic</label></fieldset>{% endif %}
{% if "realism" in questions %}<fieldset><legend>How realistic is it? (1 = clearly not, 5 = fully)</legend>
{% for score in range(1, 6) %}<label><input type="radio" name="realism" value="{{ score }}"
{% if loop.first %}required{% endif %}> {{ score }}</label> {% endfor %}</fieldset>{% endif %}
{% if "finding" in questions and finding is not none %}<fieldset>
<legend>Does the image show {{ finding }}?</legend>
{% for choice in ("yes", "no", "unsure") %}<label><input type="radio" name="finding" value="{{ choice }}"
{% if loop.first %}required{% endif %}> {{ choice }}</label> {% endfor %}</fieldset>{% endif %}
{% if "comment" in questions %}<fieldset><legend>Comment (optional)</legend>
<textarea name="comment" rows="3" cols="60" maxlength="5000"></textarea></fieldset>{% endif %}
<button type="submit" id="submit">Save and next</button>
</form>
{% endif %}
</body></html>
"""


def create_app(study: Study) -> Flask:
    app = Flask(__name__)
    design = study.design
    template = app.jinja_env.from_string(PAGE)  # compiled once; autoescaped, as every Flask string template

    def rater_of(token: str) -> str:
        rater = study.rater(token)
        if rater is None:
            abort(404)
        return rater

    def page(token: str, rater: str, error: str | None = None, status: int = 200) -> tuple[str, int]:
        item = study.current(rater)
        answered, queued = study.progress(rater)
        fields = {"item": item, "rater": rater, "answered": answered, "queued": queued, "error": error,
                  "questions": design.questions, "size": design.image_size}  # fmt: skip
        if item is not None:
            fields.update(
                image_url=f"/r/{token}/image/{item['opaque']}",
                answer_url=f"/r/{token}/answer/{item['opaque']}",
                prompt=item["prompt"] if design.prompt == "shown" else None,
                finding=item["finding"],
            )
        return template.render(**fields), status

    @app.get("/r/<token>")
    def show(token: str):
        return page(token, rater_of(token))

    @app.get("/r/<token>/image/<opaque>")
    def image(token: str, opaque: str):
        png = study.image(rater_of(token), opaque)
        if png is None:
            abort(404)
        return Response(png, mimetype="image/png")

    @app.post("/r/<token>/answer/<opaque>")
    def answer(token: str, opaque: str):
        rater = rater_of(token)
        try:
            if not study.answer(rater, opaque, request.form.to_dict()):
                abort(404)
        except ValueError as error:
            return page(token, rater, error=str(error), status=400)
        return redirect(f"/r/{token}", code=303)

    @app.after_request
    def private(response: Response) -> Response:
        response.headers["Cache-Control"] = "no-store"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Content-Security-Policy"] = "default-src 'self'; style-src 'unsafe-inline'"
        return response

    return app

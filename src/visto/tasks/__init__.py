"""Tasks: the prompts a model is asked and the parsers that read its answers.

The CLI, the server and the evaluation all go through these, so a question is phrased the
same way everywhere and an answer is read the same way everywhere:

    from visto.tasks import ground
    turns = ground.build_prompt("red circle")            # [Turn("user", "<image>\\nWhere is the red circle?")]
    answer = generate(Sample("q", [image], turns))       # any engine: text in, text out
    [hit] = ground.parse(answer, image.size)             # Box(norm=[...0..999], pixels=[...])

Modules: `caption`, `vqa`, `count`, `ocr`, `ground` (one referred object), `detect` (all
objects), `extract` (JSON), `classify` (generative, or zero-shot with a two-tower model),
`fewshot` (in-context demonstrations), `draw` (boxes on an image), `common` (box geometry).
Prompts use the synthetic world's own phrasings (`visto.data.synth.tasks`), so a model
trained there is asked in words it has seen.
"""

"""Per-token type ids shared by the data pipeline, the models and MoD routing.

The data pipeline tags every text token with one of these; the model splices
image features in and tags them IMAGE. Routing masks (which tokens may skip a
MoD layer) are built from these ids, never from hard-coded prefix lengths.
"""

PADDING = 0
IMAGE = 1
SYSTEM = 2
QUESTION = 3
ANSWER = 4

NAMES = {PADDING: "padding", IMAGE: "image", SYSTEM: "system", QUESTION: "question", ANSWER: "answer"}

# Token ids with a meaning of their own (LLaVA's constants): the label of positions without a
# loss, and the placeholder id in input_ids where the image features are spliced in.
IGNORE_INDEX = -100
IMAGE_TOKEN_INDEX = -200

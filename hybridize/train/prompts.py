"""Built-in prompts for teacher-written training text: many everyday topics in many forms (explanations, stories,
letters, how-tos, dialogues, lists, questions and answers), so that the text the teacher samples covers what the
teacher knows rather than one domain. A source's own `prompts` replace these."""

from __future__ import annotations

TOPICS = (
    "the water cycle", "volcanoes", "honey bees", "the moon", "photosynthesis", "electricity", "the human heart",
    "vaccines", "black holes", "the periodic table", "climate and weather", "earthquakes", "dinosaurs", "the ocean",
    "bread baking", "a vegetable garden", "coffee", "tea ceremonies", "chess", "football", "the Olympic Games",
    "marathon training", "learning a language", "the printing press", "the Roman Empire", "ancient Egypt",
    "the Silk Road", "the Industrial Revolution", "democracy", "money and banking", "a small business",
    "job interviews", "saving for retirement", "computers", "the internet", "programming", "robots",
    "artificial intelligence", "smartphones", "trains", "airplanes", "bicycles", "cars", "bridges", "cities",
    "farming", "forests", "rivers", "mountains", "deserts", "cats", "dogs", "horses", "birds", "whales",
    "friendship", "a family dinner", "a birthday party", "moving to a new house", "music", "painting", "poetry",
    "photography", "cooking pasta", "healthy sleep", "exercise", "first aid", "mathematics", "prime numbers",
    "geometry", "the solar system", "rainbows", "snow", "museums", "libraries", "schools", "teachers",
    "a hospital", "a lighthouse", "a detective", "a dragon", "a lost key", "a storm at sea", "a village market",
)

FORMS = (
    "{T} is",
    "Here is a short explanation of {t}.",
    "An introduction to {t}\n\n",
    "Q: What should everyone know about {t}?\nA:",
    "Write a story about {t}.\n\nOnce upon a time,",
    "Dear friend,\n\nI wanted to tell you about {t}.",
    "How to get started with {t}: a step-by-step guide.\n\n1.",
    "Five facts about {t}:\n1.",
    "A conversation between a teacher and a student about {t}.\n\nStudent:",
    "The history of {t} begins",
    "Many people ask why {t} matters. The answer is",
    "Notes from a lecture on {t}.\n\n",
)


def builtin_prompts() -> list[str]:
    """Every topic in every form; consecutive prompts take different topics (a source cycles through the list)."""
    return [form.format(t=topic, T=topic[0].upper() + topic[1:]) for form in FORMS for topic in TOPICS]


__all__ = ["FORMS", "TOPICS", "builtin_prompts"]

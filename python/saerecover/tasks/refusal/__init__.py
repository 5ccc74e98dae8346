"""The refusal setting: the task (generate, judge, teacher-forced loss on the base response),
its text judge (refusal phrases, safety cues, base-like similarity) and its feature selection
(refused-minus-answered contrast, mean-activation clamp)."""

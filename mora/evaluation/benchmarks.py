"""The benchmarks of Table 1's columns beyond MMLU: our lm-eval task YAMLs in mora/evaluation/tasks/.

- GSM8K and MATH (tasks/math/): 0-shot in the Alpaca template the MetaMath model was trained with; MetaMath's
  "The answer is: " extraction; MATH equivalence by MetaMath's normalised strings or math-verify (utils.py).
- BioMed. and Finance (tasks/adaptllm/): AdaptLLM's evaluation sets (AdaptLLM/medicine-tasks, finance-tasks), whose
  `input` holds the whole prompt; options scored by mean log-probability; AdaptLLM's metrics (README, "Table 1").
"""

from __future__ import annotations

from mora.evaluation.harness import Benchmark

GSM8K = Benchmark("gsm8k", "gsm8k_alpaca", "math/gsm8k_alpaca.yaml", "exact_match,none", 0)
MATH = Benchmark("math", "math_alpaca", "math/math_alpaca.yaml", "exact_match,none", 0)


def _adaptllm(name: str, metric: str) -> Benchmark:
    return Benchmark(name, f"adaptllm_{name}", f"adaptllm/{name}.yaml", f"{metric},none", 0)


# Tables 6 and 7, in the paper's column order (BioMMLU, MMLU subjects, is added by mora.evaluation.columns)
PUBMEDQA = _adaptllm("pubmedqa", "acc")
USMLE = _adaptllm("usmle", "acc")
RCT = _adaptllm("rct", "f1_micro")
CONVFINQA = _adaptllm("convfinqa", "exact_match_num")
FIQA_SA = _adaptllm("fiqa_sa", "f1_weighted")
HEADLINE = _adaptllm("headline", "f1_weighted_by_question")
NER = _adaptllm("ner", "entity_f1")
FPB = _adaptllm("fpb", "f1_weighted")

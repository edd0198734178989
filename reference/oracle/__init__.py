"""The correctness oracle for other engines (docs/oracle.md).

    golden       dumps: the reference's logits and per-layer tensors on token ids, in safetensors
    compare      a candidate dump graded against a reference dump, tolerances by dtype
    conformance  the adversarial conformance kit: write it, run an engine on it, grade
    hf_adapter   transformers as an engine (torch/transformers imported only when used)
    cli          `dsref golden`, `dsref compare`, `dsref conformance`

Built on the model core (config, params, numpy_ref, model, checkpoint); nothing in
the core imports it.
"""

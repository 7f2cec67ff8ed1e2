"""Generated model configs, checked structurally with Triton's own protobuf schema."""

from __future__ import annotations

from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from mofserve.core import tensors as T
from mofserve.core.checkpoints import read_shapes
from mofserve.export.onnx_export import ExportedGraph
from mofserve.export.repository import TARGETS, config_text, repository_specs, write_repository


@pytest.fixture
def graphs(tmp_path: Path) -> dict[str, ExportedGraph]:
    out = {}
    for name in (T.CLIP_VISION, T.DINOV2_VISION, T.CLIP_TEXT):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "model.onnx").write_bytes(b"graph")
        out[name] = ExportedGraph(name, folder, "digest", {}, cached=True)
    return out


def specs_for(target, tiny_profile, tiny_paths, graphs):
    shapes = read_shapes(tiny_paths, tiny_profile)
    return {s.name: s for s in repository_specs(tiny_profile, target, tiny_paths, shapes, graphs)}


@pytest.mark.parametrize("target", TARGETS)
def test_every_config_parses_back_with_tritons_schema(target, tiny_profile, tiny_paths, graphs):
    specs = specs_for(target, tiny_profile, tiny_paths, graphs)
    expected = {"preprocess", "clip_vision", "dinov2_vision", "embed", "llm",
                *(f"fuse_{m}" for m in T.FusionMode), *(f"tokens_{m}" for m in T.FusionMode),
                *(f"vqa_{m}" for m in T.FusionMode), "tokenize_text", "clip_text", "embed_text"}
    assert set(specs) == expected
    for spec in specs.values():
        parsed = text_format.Parse(config_text(spec.config), mc.ModelConfig())
        assert parsed == spec.config and parsed.max_batch_size == tiny_profile.serving.max_batch_size


def contract(config: mc.ModelConfig, timings: bool = False) -> tuple[list, list]:
    """Inputs and outputs (name, type, dims) of a config: the contract tensors, or only the timings."""
    keep = lambda name: T.is_timing(name) == timings  # noqa: E731
    return ([(i.name, i.data_type, tuple(i.dims), i.optional) for i in config.input if keep(i.name)],
            [(o.name, o.data_type, tuple(o.dims)) for o in config.output if keep(o.name)])


@pytest.mark.parametrize("target", TARGETS)
def test_targets_share_model_names_tensor_names_and_shapes(target, tiny_profile, tiny_paths, graphs):
    cpu = specs_for("cpu", tiny_profile, tiny_paths, graphs)
    other = specs_for(target, tiny_profile, tiny_paths, graphs)
    assert set(cpu) == set(other)
    for name, spec in cpu.items():
        assert contract(spec.config) == contract(other[name].config), name
        # timings may only be missing (native encoders emit none), never differ in shape
        _, cpu_timings = contract(spec.config, timings=True)
        _, other_timings = contract(other[name].config, timings=True)
        assert set(other_timings) <= set(cpu_timings), name
        if target == "gpu-torch":  # python encoders on every target that can run python: the same timings
            assert contract(other[name].config, timings=True) == contract(spec.config, timings=True), name
    if target in ("gpu-onnx", "gpu-trt"):  # Triton's native backends run no python: no encoder timing
        for name in ("clip_vision", "dinov2_vision", "clip_text", "tokens_clip", "vqa_interleaved", "embed",
                     "embed_text"):
            _, timings = contract(other[name].config, timings=True)
            assert not {t[0] for t in timings} & set(T.ENCODER_TIMINGS.values()), name


def test_interleaved_tokens_are_twice_the_patch_count(tiny_profile, tiny_paths, graphs):
    specs = specs_for("cpu", tiny_profile, tiny_paths, graphs)
    dims = {m: list(specs[f"tokens_{m}"].config.output[0].dims) for m in T.FusionMode}
    assert dims["interleaved"] == [512, 64]
    assert dims["clip"] == dims["dinov2"] == dims["additive"] == [256, 64]


def test_tokens_ensembles_run_only_the_encoders_their_mode_needs(tiny_profile, tiny_paths, graphs):
    specs = specs_for("cpu", tiny_profile, tiny_paths, graphs)
    steps = {m: [s.model_name for s in specs[f"tokens_{m}"].config.ensemble_scheduling.step] for m in T.FusionMode}
    assert steps["clip"] == ["preprocess", "clip_vision", "fuse_clip"]
    assert steps["dinov2"] == ["preprocess", "dinov2_vision", "fuse_dinov2"]
    assert steps["additive"] == [*steps["interleaved"][:3], "fuse_additive"]
    assert steps["interleaved"] == ["preprocess", "clip_vision", "dinov2_vision", "fuse_interleaved"]


def test_encoder_steps_ask_for_every_encoder_output(tiny_profile, tiny_paths, graphs):
    specs = specs_for("cpu", tiny_profile, tiny_paths, graphs)
    for name, spec in specs.items():
        if name.startswith("vqa_"):
            continue  # streaming: see the next test
        for step in spec.config.ensemble_scheduling.step:
            if step.model_name in (T.CLIP_VISION, T.DINOV2_VISION):
                assert set(step.output_map) == {o.name for o in specs[step.model_name].config.output}


def test_streaming_ensembles_output_only_what_the_llm_streams(tiny_profile, tiny_paths, graphs):
    """Triton refuses a decoupled ensemble with outputs of another origin: the earlier steps map
    only what a later step reads, and the llm echoes their timings as UPSTREAM_TIMINGS_MS."""
    specs = specs_for("cpu", tiny_profile, tiny_paths, graphs)
    llm = specs[T.LLM].config
    assert llm.model_transaction_policy.decoupled
    for mode in T.FusionMode:
        config = specs[T.vqa_model(mode)].config
        assert {o.name for o in config.output} == {o.name for o in llm.output}
        steps = list(config.ensemble_scheduling.step)
        read = {tensor for step in steps for tensor in step.input_map.values()}
        for step in steps[:-1]:
            assert set(step.output_map.values()) <= read
        timings = {k for k in steps[-1].input_map if T.is_timing(k)}
        assert timings and timings <= set(T.UPSTREAM_STAGES)
        assert not any(T.is_timing(i.name) for i in config.input)


def test_alpha_is_an_optional_input_of_the_additive_path_only(tiny_profile, tiny_paths, graphs):
    specs = specs_for("cpu", tiny_profile, tiny_paths, graphs)
    for name, spec in specs.items():
        alpha = [i for i in spec.config.input if i.name == T.ALPHA]
        assert bool(alpha) == (name in ("fuse_additive", "tokens_additive", "vqa_additive"))
        assert all(i.optional for i in alpha)


def test_cpu_target_runs_python_models_with_dynamic_batching_and_no_response_cache(tiny_profile, tiny_paths,
                                                                                    graphs):
    specs = specs_for("cpu", tiny_profile, tiny_paths, graphs)
    for name in ("preprocess", "clip_vision", "dinov2_vision", "fuse_interleaved"):
        config = specs[name].config
        assert config.backend == "python" and config.HasField("dynamic_batching")
        assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
        assert not config.response_cache.enable
    assert specs["clip_vision"].config.parameters["feature_cache_bytes"].string_value == str(256 << 20)
    assert specs["fuse_additive"].config.parameters["default_alpha"].string_value == "0.75"


def test_gpu_onnx_encoders_use_onnxruntime_with_tensorrt_fp16_on_the_gpu(tiny_profile, tiny_paths, graphs):
    specs = specs_for("gpu-onnx", tiny_profile, tiny_paths, graphs)
    config = specs["clip_vision"].config
    assert config.platform == "onnxruntime_onnx" and config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    accel = config.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert accel.name == "tensorrt" and accel.parameters["precision_mode"] == "FP16"
    fuse = specs["fuse_clip"].config
    assert fuse.parameters["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value == "no"


def test_gpu_trt_encoders_are_tensorrt_plans(tiny_profile, tiny_paths, graphs):
    specs = specs_for("gpu-trt", tiny_profile, tiny_paths, graphs)
    assert specs["dinov2_vision"].config.platform == "tensorrt_plan"
    assert specs["dinov2_vision"].config.default_model_filename == "model.plan"


def test_repository_is_written_once_per_content_digest(tmp_path, tiny_profile, tiny_paths, graphs):
    specs = list(specs_for("cpu", tiny_profile, tiny_paths, graphs).values())
    first = write_repository(specs, tmp_path / "repos")
    assert (first / "clip_vision" / "1" / "model.py").is_file()
    assert (first / "clip_vision" / "1" / "model.onnx").read_bytes() == b"graph"
    assert (first / "tokens_interleaved" / "config.pbtxt").is_file()
    assert not (first / "tokens_interleaved" / "1" / "model.py").exists()
    assert write_repository(specs, tmp_path / "repos") == first


def test_vqa_ensembles_chain_preprocess_encoders_fusion_and_the_llm(tiny_profile, tiny_paths, graphs):
    specs = specs_for("cpu", tiny_profile, tiny_paths, graphs)
    for mode in T.FusionMode:
        tokens = [s.model_name for s in specs[f"tokens_{mode}"].config.ensemble_scheduling.step]
        config = specs[f"vqa_{mode}"].config
        assert [s.model_name for s in config.ensemble_scheduling.step] == [*tokens, "llm"]
        inputs = {i.name: i.optional for i in config.input}
        assert inputs == {"IMAGE": False, "QUESTION": False, "OPTIONS": True, "MAX_NEW_TOKENS": True,
                          "TEMPERATURE": True, "TOP_P": True, "SEED": True, "REQUEST_ID": True,
                          **({"ALPHA": True} if mode is T.FusionMode.ADDITIVE else {})}
        outputs = [o.name for o in config.output]
        assert {"TEXT_DELTA", "ANSWER", "CHOSEN_OPTION", "OPTION_SCORES", "FINISH_REASON", "PROMPT_TOKENS",
                "COMPLETION_TOKENS", "TIMING_LLM_MS", "UPSTREAM_TIMINGS_MS"} <= set(outputs)
        # the visual tokens and patch features stay inside Triton
        assert not {"VISUAL_TOKENS", "CLIP_FEATURES", "DINO_FEATURES", "PIXEL_VALUES"} & set(outputs)


@pytest.mark.parametrize("target", TARGETS)
def test_every_ensemble_tensor_is_consumed_or_an_output(target, tiny_profile, tiny_paths, graphs):
    """Triton refuses an ensemble tensor that nothing reads; every step input must be fed."""
    specs = specs_for(target, tiny_profile, tiny_paths, graphs)
    for spec in specs.values():
        config = spec.config
        if config.platform != "ensemble":
            continue
        available = {i.name for i in config.input}
        read: set[str] = set()
        for step in config.ensemble_scheduling.step:
            model = specs[step.model_name].config
            # optional inputs a step's ensemble cannot feed (another mode's timings, CANCEL) stay unmapped
            required = {i.name for i in model.input if not i.optional}
            assert required <= set(step.input_map) <= {i.name for i in model.input}, (spec.name, step.model_name)
            if config.name.startswith("vqa_"):  # streaming: only what a later step reads (test above)
                assert set(step.output_map) <= {o.name for o in model.output}, (spec.name, step.model_name)
            else:
                assert set(step.output_map) == {o.name for o in model.output}, (spec.name, step.model_name)
            assert set(step.input_map.values()) <= available, (spec.name, step.model_name)
            read |= set(step.input_map.values())
            available |= set(step.output_map.values())
        produced = available - {i.name for i in config.input}
        assert produced - read == {o.name for o in config.output}, spec.name


def test_tokens_and_embed_ensembles_carry_the_stage_timings_on_cpu(tiny_profile, tiny_paths, graphs):
    specs = specs_for("cpu", tiny_profile, tiny_paths, graphs)
    outputs = lambda name: {o.name for o in specs[name].config.output}  # noqa: E731
    assert {"TIMING_PREPROCESS_MS", "TIMING_CLIP_MS", "TIMING_FUSION_MS"} <= outputs("tokens_clip")
    assert "TIMING_DINOV2_MS" not in outputs("tokens_clip")
    assert {"TIMING_PREPROCESS_MS", "TIMING_CLIP_MS", "TIMING_DINOV2_MS"} <= outputs("embed")
    assert specs["tokens_interleaved"].config.output[0].name == "VISUAL_TOKENS"


@pytest.mark.parametrize("target", ["cpu", "gpu-torch"])
def test_encoder_timings_reach_the_llm_through_the_streaming_ensembles(target, tiny_profile, tiny_paths, graphs):
    """The vqa_<mode> ensembles end in the decoupled llm, which echoes the upstream stages' timings
    (UPSTREAM_TIMINGS_MS): every encoder a mode runs must feed its timing to the llm step."""
    specs = specs_for(target, tiny_profile, tiny_paths, graphs)
    for mode in T.FusionMode:
        steps = list(specs[T.vqa_model(mode)].config.ensemble_scheduling.step)
        encoders = [s.model_name for s in steps if s.model_name in (T.CLIP_VISION, T.DINOV2_VISION)]
        fed = {k for k in steps[-1].input_map if T.is_timing(k)}
        assert fed == {T.TIMING_PREPROCESS, T.TIMING_FUSION, *(T.ENCODER_TIMINGS[e] for e in encoders)}, mode
        for step in steps:
            if step.model_name in encoders:
                assert T.ENCODER_TIMINGS[step.model_name] in step.output_map, (mode, step.model_name)
    outputs = {o.name for o in specs["tokens_interleaved"].config.output}
    assert {T.TIMING_CLIP, T.TIMING_DINOV2} <= outputs
    assert T.TIMING_CLIP_TEXT in {o.name for o in specs["embed_text"].config.output}


@pytest.mark.parametrize("target", TARGETS)
def test_llm_is_one_decoupled_python_instance_with_its_limits_as_parameters(target, tiny_profile, tiny_paths,
                                                                             graphs):
    config = specs_for(target, tiny_profile, tiny_paths, graphs)["llm"].config
    assert config.backend == "python" and config.model_transaction_policy.decoupled
    assert not config.HasField("dynamic_batching")  # the engine batches in flight, not Triton
    assert [g.count for g in config.instance_group] == [1]
    assert config.max_batch_size == tiny_profile.serving.max_batch_size
    assert [list(i.dims) for i in config.input if i.name == "VISUAL_TOKENS"] == [[-1, 64]]
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params["llava"] == str(tiny_paths.llava) and params["random_weights"] == "true"
    assert (params["max_new_tokens"], params["max_new_tokens_limit"], params["threads"]) == ("16", "512", "1")
    assert (params["max_sequences"], params["kv_cache_mb"], params["prefill_chunk"]) == ("8", "0", "0")
    kind = config.instance_group[0].kind
    if target == "cpu":
        assert kind == mc.ModelInstanceGroup.KIND_CPU and "FORCE_CPU_ONLY_INPUT_TENSORS" not in params
    else:
        assert kind == mc.ModelInstanceGroup.KIND_GPU and params["FORCE_CPU_ONLY_INPUT_TENSORS"] == "no"


@pytest.mark.parametrize("target", TARGETS)
def test_embed_text_tokenizes_in_python_then_runs_the_clip_text_graph(target, tiny_profile, tiny_paths, graphs):
    import math

    specs = specs_for(target, tiny_profile, tiny_paths, graphs)
    tokenize = specs["tokenize_text"].config
    assert tokenize.backend == "python" and tokenize.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU
    assert [(i.name, i.data_type, list(i.dims)) for i in tokenize.input] == [("TEXT", mc.TYPE_STRING, [1])]
    assert (tokenize.output[0].name, tokenize.output[0].data_type, list(tokenize.output[0].dims)) == (
        "INPUT_IDS", mc.TYPE_INT64, [77])
    assert tokenize.parameters["tokenizer"].string_value == str(tiny_paths.clip)
    text = specs["clip_text"].config
    assert [(i.name, i.data_type, list(i.dims)) for i in text.input] == [("INPUT_IDS", mc.TYPE_INT64, [77])]
    assert (text.output[0].name, list(text.output[0].dims)) == ("TEXT_EMBEDS", [24])  # = CLIP_EMBEDS' width
    if target == "cpu":
        assert text.backend == "python" and specs["clip_text"].source == "vision_encoder"
        assert {o.name for o in text.output} == {"TEXT_EMBEDS", "TIMING_CLIP_TEXT_MS"}
    elif target != "gpu-torch":  # gpu-torch: python backend (tests/unit/test_gpu_torch.py)
        assert text.platform == ("onnxruntime_onnx" if target == "gpu-onnx" else "tensorrt_plan")
        assert [o.name for o in text.output] == ["TEXT_EMBEDS"]
    embed = specs["embed_text"].config
    assert [s.model_name for s in embed.ensemble_scheduling.step] == ["tokenize_text", "clip_text"]
    assert [i.name for i in embed.input] == ["TEXT"] and embed.output[0].name == "TEXT_EMBEDS"
    assert "INPUT_IDS" not in {o.name for o in embed.output}
    # the seeded CLIP keeps CLIP's initial temperature 1/0.07 (OpenAI's trained one is 100)
    assert math.isclose(float(embed.parameters["logit_scale"].string_value), 1 / 0.07, rel_tol=1e-4)


def test_a_vision_only_clip_checkpoint_is_served_without_the_text_models(tmp_path, tiny_profile, tiny_paths, graphs):
    from dataclasses import replace

    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from mofserve.export.configs import CLIP_TEXT_EXPORT

    assert CLIP_TEXT_EXPORT.skip_reason(tiny_paths) is None
    vision_only = tmp_path / "clip-vision"
    CLIPVisionModelWithProjection(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                   num_attention_heads=4, patch_size=14, projection_dim=24)
                                  ).save_pretrained(vision_only)
    paths = replace(tiny_paths, clip=vision_only)
    assert "vision-only" in CLIP_TEXT_EXPORT.skip_reason(paths)
    without_text = {name: g for name, g in graphs.items() if name != T.CLIP_TEXT}
    names = set(specs_for("cpu", tiny_profile, paths, without_text))
    assert not names & {"tokenize_text", "clip_text", "embed_text"} and "embed" in names

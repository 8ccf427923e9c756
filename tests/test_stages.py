"""The one declaration of every variant (stages.SPECS) and what is derived from it."""

import importlib

from bertforge.stages import EXTRA_VARIANTS, SPECS, VARIANTS


def test_every_declared_variant_is_buildable_from_what_was_declared_before_it():
    from bertforge import pipeline
    from bertforge.recipe import Recipe
    from bertforge.validation.config import default_gates

    declared: list[str] = []
    sections = Recipe.model_fields
    for spec in SPECS:
        assert spec.parent is None or spec.parent in declared, f"{spec.name}: parent {spec.parent} declared later"
        module = importlib.import_module(f"bertforge.{spec.stage}")
        assert isinstance(module.NAME, str) and isinstance(module.VERSION, str) and callable(module.run)
        assert spec.section in sections, f"{spec.name}: no recipe section {spec.section}"
        assert pipeline.VARIANT_PLAN[spec.name] == (module.NAME, spec.parent, spec.section)
        assert pipeline.STAGES[module.NAME] is module
        declared.append(spec.name)
    assert list(default_gates()) == declared
    assert Recipe().variants == VARIANTS and not set(VARIANTS) & set(EXTRA_VARIANTS)
    assert pipeline.required_variants(("int8-dynamic-masked",)) == ["fp32", "fused", "int8-dynamic",
                                                                    "int8-dynamic-masked"]


def test_the_cli_help_names_every_variant_and_each_extra_with_what_it_is(capsys):
    import pytest

    from bertforge.cli import main

    with pytest.raises(SystemExit):
        main(["build", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for spec in SPECS:
        assert spec.name in text
        if spec.extra:
            assert f"{spec.name} ({spec.summary})" in text

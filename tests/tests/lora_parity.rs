//! LoRA parity: the tiny Llama with each PEFT fixture adapter (made by
//! `scripts/make-lora-fixtures`) in a device slot gives transformers + peft's merged-weights
//! logits, for several target sets, ranks and rsLoRA; all adapters sit in slots at once so a
//! wrong slot index would show; and an empty slot leaves the base logits.
use pagoda_adapters::{AdapterError, AdapterLimits, AdapterRegistry};
use pagoda_models::{load_weights, LoadOptions, Model};
use pagoda_tests::{check_with_lora, devices, expected, fixture, TOL};

const ADAPTERS: [&str; 4] = ["qv-r4", "all-r8", "mlp-r16-rslora", "ko-r2"];

fn registry(model: &dyn Model) -> AdapterRegistry {
    AdapterRegistry::new(model.lora_shapes(), AdapterLimits::default(), vec![])
}

#[test]
fn adapters_match_merged_weights_reference() {
    for device in devices() {
        let opts = LoadOptions {
            device,
            ..LoadOptions::default()
        };
        let mut model = load_weights(&fixture("tiny-llama"), &opts).unwrap();
        model.init_lora_slots(ADAPTERS.len() + 1, 16).unwrap();
        let reg = registry(&model);
        for (slot, name) in ADAPTERS.iter().enumerate() {
            let dir = fixture("tiny-llama-lora").join(name);
            reg.load(name, &dir).unwrap();
            let adapter = reg.resolve(name).unwrap();
            // Slot 0 stays empty.
            model
                .set_lora_slot(slot + 1, Some(&adapter.weights))
                .unwrap();
        }
        for (slot, name) in ADAPTERS.iter().enumerate() {
            let exp = expected(&format!("tiny-llama-lora/{name}"));
            for (chunk, block_size) in [(usize::MAX, 16), (5, 4)] {
                check_with_lora(
                    &model,
                    &exp,
                    (chunk, block_size),
                    TOL,
                    true,
                    Some(slot as u32 + 1),
                );
            }
        }
        check_with_lora(&model, &expected("tiny-llama"), (7, 16), TOL, true, Some(0));
    }
}

#[test]
fn bad_adapters_are_refused_with_reasons() {
    let model = load_weights(&fixture("tiny-llama"), &LoadOptions::default()).unwrap();
    let limits = AdapterLimits {
        max_lora_rank: 8,
        max_adapters: 2,
        ..AdapterLimits::default()
    };
    let reg = AdapterRegistry::new(model.lora_shapes(), limits, vec!["base".into()]);
    let src = fixture("tiny-llama-lora");
    let tmp = std::env::temp_dir().join(format!("pagoda-bad-lora-{}", std::process::id()));
    let make = |name: &str, edit: &dyn Fn(&mut serde_json::Value)| {
        let dir = tmp.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let mut cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(src.join("qv-r4/adapter_config.json")).unwrap(),
        )
        .unwrap();
        edit(&mut cfg);
        std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
        std::fs::copy(
            src.join("qv-r4/adapter_model.safetensors"),
            dir.join("adapter_model.safetensors"),
        )
        .unwrap();
        dir
    };
    let cases: Vec<(&str, std::path::PathBuf, &str)> = vec![
        ("rank", src.join("mlp-r16-rslora"), "--max-lora-rank"),
        ("missing", tmp.join("nowhere"), "not a directory"),
        (
            "dora",
            make("dora", &|c| c["use_dora"] = true.into()),
            "DoRA",
        ),
        (
            "lm",
            make("lm", &|c| {
                c["target_modules"] = serde_json::json!(["lm_head"])
            }),
            "lm_head",
        ),
        ("r", make("r", &|c| c["r"] = 3.into()), "do not fit rank 3"),
        (
            "fan",
            make("fan", &|c| c["fan_in_fan_out"] = true.into()),
            "fan_in_fan_out",
        ),
        ("bias", make("bias", &|c| c["bias"] = "all".into()), "bias"),
        (
            "json",
            {
                let d = make("json", &|_| {});
                std::fs::write(d.join("adapter_config.json"), "{not json").unwrap();
                d
            },
            "adapter_config.json",
        ),
        (
            "trunc",
            {
                let d = make("trunc", &|_| {});
                let f = d.join("adapter_model.safetensors");
                let bytes = std::fs::read(&f).unwrap();
                std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
                d
            },
            "adapter_model.safetensors",
        ),
        ("base", src.join("qv-r4"), "base model"),
        ("bad name!", src.join("qv-r4"), "must be 1 to 128"),
        ("shape", src.join("../tiny-llama"), "adapter_config.json"),
    ];
    for (name, dir, needle) in cases {
        let name = if name == "base" { "base" } else { name };
        let err = reg.load(name, &dir).unwrap_err();
        assert!(
            err.to_string().contains(needle),
            "{name}: {err} (wanted {needle:?})"
        );
    }
    // Count limit: two fit, a third doesn't; replacing one does.
    reg.load("a", &src.join("qv-r4")).unwrap();
    reg.load("b", &src.join("ko-r2")).unwrap();
    assert!(matches!(
        reg.load("c", &src.join("qv-r4")),
        Err(AdapterError::Limit(_))
    ));
    let old = reg.resolve("a").unwrap();
    reg.load("a", &src.join("all-r8")).unwrap();
    assert_ne!(reg.resolve("a").unwrap().id, old.id, "a new generation");
    assert_eq!(
        reg.stats().num_live_generations,
        3,
        "the old one lives while held"
    );
    drop(old);
    assert_eq!(reg.stats().num_live_generations, 2);
    reg.unload("b").unwrap();
    assert!(matches!(reg.unload("b"), Err(AdapterError::NotFound(_))));
    assert!(matches!(reg.resolve("b"), Err(AdapterError::NotFound(_))));
    assert_eq!(reg.stats().num_live_generations, 1);
    std::fs::remove_dir_all(&tmp).unwrap();
}

//! docs/snapshot.schema.json is generated from the types; CI keeps it in sync.

#[test]
fn committed_schema_matches_the_types() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/snapshot.schema.json");
    let generated = serde_json::to_string_pretty(&mig_planner::Snapshot::json_schema()).unwrap() + "\n";
    if std::env::var_os("UPDATE_SCHEMA").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "docs/snapshot.schema.json is stale: run `UPDATE_SCHEMA=1 cargo test -p mig-planner schema`"
    );
}

#[test]
fn example_snapshots_parse() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/examples");
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            mig_planner::Snapshot::from_json(&std::fs::read_to_string(&path).unwrap())
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            n += 1;
        }
    }
    assert!(n > 0);
}

#[test]
fn utilization_outside_the_unit_interval_is_refused_with_its_path() {
    let text = r#"{"nodes": [{"name": "n", "gpus": [{"index": 0, "product": "h100-80gb",
        "instances": [{"profile": "7g.80gb", "start": 0, "utilization": -7}]}]}]}"#;
    let e = mig_planner::Snapshot::from_json(text).unwrap_err();
    assert_eq!(e.path, "$.nodes[0].gpus[0].instances[0].utilization");
    assert!(e.message.contains("outside [0, 1]"), "{}", e.message);
    let ok = text.replace("-7", "0.25");
    assert!(mig_planner::Snapshot::from_json(&ok).is_ok());
}

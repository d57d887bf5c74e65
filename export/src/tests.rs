//! Exports of hostile and ordinary configs, read back as their platform
//! would read them.

use std::path::Path;

use apm_compiler::{MemLoader, compile};
use serde_yaml_ng::Value;

use crate::{Options, Target, export};

/// What an attacker who writes one value of a config would try: end the
/// string, start a key, a list item, a document, a comment, a directive,
/// an interpolation, a specifier.
const HOSTILE: &str = "x\"\ninjected: 1\n- injected\n---\ninjected: 2\r\n#c 'q' ${HOME} $(HOME) %i %{x} \\ \u{2028}injected=3\u{85}end";

fn config(value: &str) -> String {
    let q = apm_compiler::values::quote;
    // Only paths take `$VAR` expansion, with `$$` for one `$`.
    let qp = |text: &str| q(&text.replace('$', "$$"));
    format!(
        "worker {{ name evil; exec {exec}; params {p}, plain; path {path}; env EVIL={env}; env API_TOKEN={env}; \
         user {user}; upstream port; server http://0.0.0.0:8080; health_check http://127.0.0.1:8080/h; \
         env_file {path}; }}\n",
        exec = q(&format!("/bin/{value}")),
        p = q(value),
        path = qp(&format!("/srv/{value}")),
        env = q(value),
        user = q(value),
    )
}

fn exported(text: &str, target: Target) -> crate::Output {
    let loader = MemLoader::new()
        .file("a.conf", text.to_owned())
        .user(HOSTILE);
    let compilation = compile(Path::new("a.conf"), &loader).unwrap();
    assert!(!compilation.has_errors(), "{:?}", compilation.diagnostics);
    assert_eq!(compilation.config.workers[0].params[0].value, HOSTILE);
    export(
        &compilation,
        target,
        &Options {
            image: "img".to_owned(),
        },
    )
}

fn has_key(value: &Value, key: &str) -> bool {
    match value {
        Value::Mapping(map) => map
            .iter()
            .any(|(k, v)| k.as_str() == Some(key) || has_key(v, key)),
        Value::Sequence(items) => items.iter().any(|v| has_key(v, key)),
        _ => false,
    }
}

fn documents(text: &str) -> Vec<Value> {
    use serde::Deserialize;
    serde_yaml_ng::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).unwrap())
        .collect()
}

#[test]
fn a_hostile_value_stays_one_value_in_kubernetes_manifests() {
    let output = exported(&config(HOSTILE), Target::Kubernetes);
    let text = &output.files[0].1;
    let docs = documents(text);
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        ["ConfigMap", "Secret", "Deployment", "Service", "Ingress"]
    );
    assert!(docs.iter().all(|d| !has_key(d, "injected")), "{text}");
    let container = &docs[2]["spec"]["template"]["spec"]["containers"][0];
    // Kubernetes reads `$$` as one `$`.
    assert_eq!(
        container["args"][0].as_str().unwrap().replace("$$", "$"),
        HOSTILE
    );
    assert_eq!(docs[0]["data"]["EVIL"].as_str().unwrap(), HOSTILE);
    // The secret-looking variable is in the Secret only.
    assert_eq!(
        docs[1]["stringData"]["API_TOKEN"].as_str().unwrap(),
        HOSTILE
    );
    assert!(!has_key(&docs[0], "API_TOKEN"));
    // Every comment line stays a comment.
    for line in text.lines().filter(|l| l.starts_with('#')) {
        assert!(!line.contains('\n'));
    }
}

#[test]
fn a_hostile_value_stays_one_value_in_a_compose_file() {
    let output = exported(&config(HOSTILE), Target::Compose);
    let docs = documents(&output.files[0].1);
    assert_eq!(docs.len(), 1);
    assert!(!has_key(&docs[0], "injected"));
    let service = &docs[0]["services"]["evil"];
    assert_eq!(
        service["entrypoint"][1]
            .as_str()
            .unwrap()
            .replace("$$", "$"),
        HOSTILE
    );
    assert_eq!(
        service["environment"]["EVIL"]
            .as_str()
            .unwrap()
            .replace("$$", "$"),
        HOSTILE
    );
    // Compose interpolates a lone `$`: none is left.
    let raw = service["environment"]["EVIL"].as_str().unwrap();
    assert!(raw.replace("$$", "").find('$').is_none());
}

/// The lines of a unit file as systemd reads them: sections, comments and
/// `Key=value` assignments of known settings, nothing else.
#[test]
fn a_hostile_value_adds_no_line_to_a_systemd_unit() {
    let output = exported(&config(HOSTILE), Target::Systemd);
    let text = &output.files[0].1;
    for line in text.lines() {
        let known = line.is_empty()
            || line.starts_with('#')
            || line.starts_with('[')
            || line
                .split_once('=')
                .is_some_and(|(key, _)| key.bytes().all(|b| b.is_ascii_alphabetic()));
        assert!(known, "a line systemd would misread: {line:?}\n{text}");
        assert!(!line.starts_with("injected"), "{text}");
    }
    let exec = text.lines().find(|l| l.starts_with("ExecStart=")).unwrap();
    assert!(exec.contains("%%i") && exec.contains("$${HOME}"), "{exec}");
    // A user name with a newline cannot be written unquoted: left out, warned.
    assert!(!text.contains("\nUser="));
    assert!(output.warnings.iter().any(|w| w.key == "user"));
}

#[test]
fn a_hostile_value_opens_no_interpolation_in_a_nomad_job() {
    let output = exported(&config(HOSTILE), Target::Nomad);
    let text = &output.files[0].1;
    for line in text.lines() {
        assert!(!line.trim_start().starts_with("injected"), "{text}");
    }
    assert!(
        !text
            .replace("$${", "")
            .replace("${NOMAD_ALLOC_INDEX}", "")
            .contains("${")
    );
    assert!(!text.replace("%%{", "").contains("%{"));
}

#[test]
fn warnings_name_the_file_and_line_of_the_key() {
    let text = "worker {\n  exec /bin/app;\n  watch \"src/**\";\n}\n";
    let loader = MemLoader::new().file("a.conf", text);
    let compilation = compile(Path::new("a.conf"), &loader).unwrap();
    for target in Target::ALL {
        let output = export(&compilation, target, &Options { image: "i".into() });
        let warning = output.warnings.iter().find(|w| w.key == "watch").unwrap();
        assert_eq!(warning.at, Some((Path::new("a.conf").to_path_buf(), 3)));
        assert!(
            output
                .files
                .iter()
                .any(|(_, f)| f.contains("# WARN: ") && f.contains("`watch`"))
        );
    }
}

#[test]
fn every_ok_case_of_the_check_corpus_exports_to_every_target() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../corpus/check/ok");
    let mut exported_any = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let root = if path.is_dir() {
            path.join("apm.conf")
        } else {
            path.clone()
        };
        if root.extension().is_none_or(|e| e != "conf") || !root.exists() {
            continue;
        }
        let compilation = compile(&root, &apm_compiler::FsLoader).unwrap();
        for target in Target::ALL {
            let output = export(&compilation, target, &Options { image: "i".into() });
            assert!(
                !output.files.is_empty(),
                "{} to {}",
                root.display(),
                target.name()
            );
        }
        exported_any += 1;
    }
    assert!(exported_any > 40, "only {exported_any} cases found");
}

/// A worker that needs apm's proxy, as a config file that also sets what
/// the platform carries (its instances, user, environment, memory).
const UNDER_APM: &str = "worker { name chat; exec /usr/bin/node; params chat.js; path /srv/app; instances 3; \
     user app; env A=1; env API_TOKEN=t; memory_limit 64M; server https://0.0.0.0:8443; tls on; \
     tls_cert /certs/c.pem; tls_key /certs/k.pem; max_conns 10; vanguard { rate_limit 5; } }\n";

/// The worker's own apm.conf as `apm container` would compile it.
fn fragment_compiled(text: &str) -> apm_compiler::ir::WorkerSpec {
    let loader = MemLoader::new()
        .file("/etc/apm/apm.conf", text.to_owned())
        .file("/etc/apm/tls/tls.crt", "")
        .file("/etc/apm/tls/tls.key", "")
        .file("/etc/apm/tls/cert.pem", "")
        .file("/etc/apm/tls/key.pem", "");
    let compilation = compile(Path::new("/etc/apm/apm.conf"), &loader).unwrap();
    assert!(
        !compilation.has_errors(),
        "{text}\n{:?}",
        compilation.diagnostics
    );
    compilation.config.workers.into_iter().next().unwrap()
}

fn exported_from(text: &str, target: Target) -> crate::Output {
    let loader = MemLoader::new()
        .file("a.conf", text.to_owned())
        .file("/certs/c.pem", "")
        .file("/certs/k.pem", "")
        .user("app");
    let compilation = compile(Path::new("a.conf"), &loader).unwrap();
    assert!(!compilation.has_errors(), "{:?}", compilation.diagnostics);
    export(
        &compilation,
        target,
        &Options {
            image: "img".into(),
        },
    )
}

#[test]
fn a_worker_that_needs_apms_proxy_runs_apm_container_with_its_own_config_in_kubernetes() {
    let output = exported_from(UNDER_APM, Target::Kubernetes);
    let docs = documents(&output.files[0].1);
    let config = docs
        .iter()
        .find(|d| d["metadata"]["name"] == "chat-apm")
        .unwrap();
    let spec = fragment_compiled(config["data"]["apm.conf"].as_str().unwrap());
    // apm keeps its proxy's settings and TLS, from the mounted Secret; the
    // platform keeps the rest.
    assert_eq!(spec.max_conns.value, 10);
    assert!(spec.vanguard.is_some());
    assert_eq!(
        spec.tls_cert.unwrap().value,
        Path::new("/etc/apm/tls/tls.crt")
    );
    assert_eq!(spec.instances.value, 1);
    assert!(spec.user.is_none() && spec.env.is_empty() && spec.memory_limit.is_none());
    let deployment = docs.iter().find(|d| d["kind"] == "Deployment").unwrap();
    assert_eq!(deployment["spec"]["replicas"], 3);
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(container["command"][0], "apm");
    assert_eq!(container["command"][2], "/etc/apm/apm.conf");
    assert_eq!(container["ports"][0]["containerPort"], 8443);
    assert_eq!(container["resources"]["limits"]["memory"], "67108864");
    // The variables reach the program through apm's own environment.
    assert_eq!(container["envFrom"].as_sequence().unwrap().len(), 2);
    let volumes: Vec<&str> = (pod["volumes"].as_sequence().unwrap().iter())
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    assert_eq!(volumes, ["apm-conf", "apm-tls"]);
    // apm terminates TLS: an Ingress would need passthrough.
    assert!(docs.iter().all(|d| d["kind"] != "Ingress"));
    assert!(
        output
            .warnings
            .iter()
            .all(|w| w.key != "max_conns" && !w.key.starts_with("vanguard"))
    );
}

#[test]
fn a_worker_that_needs_apms_proxy_runs_apm_container_with_its_own_config_in_compose() {
    let output = exported_from(UNDER_APM, Target::Compose);
    let doc = &documents(&output.files[0].1)[0];
    let content = doc["configs"]["chat-apm"]["content"].as_str().unwrap();
    let spec = fragment_compiled(&content.replace("$$", "$"));
    assert_eq!(
        spec.tls_key.unwrap().value,
        Path::new("/etc/apm/tls/key.pem")
    );
    let service = &doc["services"]["chat"];
    assert_eq!(service["entrypoint"][1], "container");
    assert_eq!(service["volumes"][0]["source"], "/certs/c.pem");
    assert_eq!(service["ports"][0]["target"], 8443);
    assert_eq!(service["configs"][0]["target"], "/etc/apm/apm.conf");
}

#[test]
fn a_worker_on_its_own_port_without_apms_settings_runs_its_program_directly() {
    let text = "worker { name api; exec /bin/api; upstream port; server http://0.0.0.0:80; }\n";
    let docs = documents(&exported_from(text, Target::Kubernetes).files[0].1);
    let container = &docs[0]["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["command"][0], "/bin/api");
    let compose = documents(&exported_from(text, Target::Compose).files[0].1);
    assert_eq!(compose[0]["services"]["api"]["entrypoint"][0], "/bin/api");
    assert!(compose[0].get("configs").is_none());
}

#[test]
fn a_hostile_value_stays_one_value_in_the_config_apm_container_reads() {
    let text = config(HOSTILE).replace("upstream port;", "upstream connector;");
    let loader = MemLoader::new().file("a.conf", text).user(HOSTILE);
    let compilation = compile(Path::new("a.conf"), &loader).unwrap();
    let output = export(
        &compilation,
        Target::Kubernetes,
        &Options { image: "i".into() },
    );
    let docs = documents(&output.files[0].1);
    assert!(docs.iter().all(|d| !has_key(d, "injected")));
    let config = docs
        .iter()
        .find(|d| d["metadata"]["name"] == "evil-apm")
        .unwrap();
    let spec = fragment_compiled(config["data"]["apm.conf"].as_str().unwrap());
    assert_eq!(spec.params[0].value, HOSTILE);
    assert_eq!(spec.exec.value, format!("/bin/{HOSTILE}"));
}

//! Contract tests, no services needed: the Kubernetes manifests in `deploy/kubernetes/` (the
//! worker, and the optional operator console beside it) agree with each other, with the
//! Dockerfile and with the worker's configuration, as `docker-compose.yml`'s console does with its
//! worker; `docs/asyncapi.yaml`
//! describes the topology and headers the code uses, with the payload schemas of `schemas/`;
//! and the sample job, the document's examples and the events the code builds validate against
//! those schemas (with formats checked), while broken messages do not.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use audio_worker::asset::CatalogEntry;
use audio_worker::asset::StoredObject;
use audio_worker::error::{ErrorClass, Stage};
use audio_worker::events::{AudioFailed, AudioSaved};
use audio_worker::job::SaveAudioJob;
use audio_worker::url_policy::UrlPolicy;
use chrono::Utc;
use serde::Deserialize;
use serde_json::{Value, json};

const MANIFESTS: &str = "deploy/kubernetes";
const ASYNCAPI: &str = "docs/asyncapi.yaml";
/// Variables that hold credentials: never in the ConfigMap, never a plain `value`.
const CREDENTIALS: [&str; 3] = ["AMQP_URL", "MONGODB_URI", "S3_SECRET_ACCESS_KEY"];
/// The operator console's access token: a key of the Secret, read by the console only.
const CONSOLE_TOKEN: &str = "CONSOLE_TOKEN";
/// The worker's Deployment (deployment.yaml) and the operator console's (console.yaml), whose
/// Service has the same name.
const WORKER: &str = "audio-worker";
const CONSOLE: &str = "audio-worker-console";
/// The Secret both read their credentials from (secret.example.yaml).
const SECRET: &str = "audio-worker";

fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

fn read(relative: &str) -> String {
    let path = repo_path(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every non-empty document of a YAML file, as JSON values.
fn yaml_documents(relative: &str) -> Vec<Value> {
    let text = read(relative);
    serde_norway::Deserializer::from_str(&text)
        .map(|document| Value::deserialize(document).unwrap_or_else(|e| panic!("{relative}: {e}")))
        .filter(|value| !value.is_null())
        .collect()
}

fn str_at<'a>(value: &'a Value, pointer: &str) -> &'a str {
    value
        .pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no string at {pointer} in {value}"))
}

/// The resources of `deploy/kubernetes/`, by (kind, name), each with the file it is in.
struct Manifests(BTreeMap<(String, String), (String, Value)>);

impl Manifests {
    fn load() -> Self {
        let mut resources = BTreeMap::new();
        for file in yaml_files(MANIFESTS) {
            if file == "kustomization.yaml" {
                continue;
            }
            for resource in yaml_documents(&format!("{MANIFESTS}/{file}")) {
                let kind = str_at(&resource, "/kind").to_owned();
                let name = str_at(&resource, "/metadata/name").to_owned();
                assert!(resource["apiVersion"].is_string(), "{file}: {kind}/{name} has no apiVersion");
                let previous = resources.insert((kind.clone(), name.clone()), (file.clone(), resource));
                assert!(previous.is_none(), "{kind}/{name} is defined twice");
            }
        }
        Self(resources)
    }

    fn get(&self, kind: &str, name: &str) -> &Value {
        &self.0.get(&(kind.into(), name.into())).unwrap_or_else(|| panic!("no {kind}/{name}")).1
    }

    /// The only resource of `kind`.
    fn one(&self, kind: &str) -> &Value {
        let mut of_kind = self.0.iter().filter(|((k, _), _)| k == kind);
        let (_, (_, resource)) = of_kind.next().unwrap_or_else(|| panic!("no {kind}"));
        assert!(of_kind.next().is_none(), "more than one {kind}");
        resource
    }

    /// The worker's Deployment (not the console's).
    fn deployment(&self) -> &Value {
        self.get("Deployment", WORKER)
    }

    /// The worker container of the Deployment.
    fn container(&self) -> &Value {
        only_container(self.deployment())
    }

    /// The operator console's Deployment.
    fn console(&self) -> &Value {
        self.get("Deployment", CONSOLE)
    }

    /// The console's container.
    fn console_container(&self) -> &Value {
        only_container(self.console())
    }

    /// The ConfigMap the worker container takes its environment from.
    fn config(&self) -> BTreeMap<String, String> {
        let from = self.container()["envFrom"].as_array().expect("envFrom");
        let names: Vec<&str> =
            from.iter().filter_map(|f| f.pointer("/configMapRef/name")?.as_str()).collect();
        assert_eq!(names.len(), 1, "one ConfigMap in envFrom: {names:?}");
        let data = self.get("ConfigMap", names[0])["data"].as_object().expect("ConfigMap data");
        data.iter()
            .map(|(k, v)| {
                (k.clone(), v.as_str().unwrap_or_else(|| panic!("{k} must be a string")).to_owned())
            })
            .collect()
    }

    /// The keys of the Secret example.
    fn secret_keys(&self, name: &str) -> BTreeSet<String> {
        let secret = self.get("Secret", name);
        let data =
            secret["stringData"].as_object().or_else(|| secret["data"].as_object()).expect("secret data");
        data.keys().cloned().collect()
    }
}

/// The container of a Deployment's pod, its only one.
fn only_container(deployment: &Value) -> &Value {
    let containers = deployment["spec"]["template"]["spec"]["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1, "one container per pod");
    &containers[0]
}

/// A container's `env` entries, by name.
fn env_of(container: &Value) -> BTreeMap<&str, &Value> {
    container["env"].as_array().expect("env").iter().map(|var| (str_at(var, "/name"), var)).collect()
}

/// The variables named in `deploy/env.example`, set or commented out.
fn documented_variables() -> BTreeSet<String> {
    read("deploy/env.example")
        .lines()
        .filter_map(|l| l.trim_start_matches(['#', ' ']).split_once('='))
        .map(|(name, _)| name.trim().to_owned())
        .collect()
}

/// The variables a container reads from files of the Secret `secret` (each `{VAR}_FILE` names
/// the file of the key VAR), after checking that the Secret is mounted read-only, that it has
/// every key mounted, and that every `*_FILE` points into the mount.
fn secret_files(pod: &Value, container: &Value, secret: &str, keys: &BTreeSet<String>) -> BTreeSet<String> {
    let volume = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v.pointer("/secret/secretName").and_then(Value::as_str) == Some(secret))
        .unwrap_or_else(|| panic!("the Secret {secret} is not mounted as a volume"));
    let mount = container["volumeMounts"]
        .as_array()
        .expect("volumeMounts")
        .iter()
        .find(|m| m["name"] == volume["name"])
        .expect("secret volume mount");
    assert_eq!(mount["readOnly"], true);
    let mount_path = str_at(mount, "/mountPath");
    let files: BTreeMap<String, String> = match volume["secret"]["items"].as_array() {
        Some(items) => items.iter().map(|i| (str_at(i, "/path").into(), str_at(i, "/key").into())).collect(),
        None => keys.iter().map(|k| (k.clone(), k.clone())).collect(),
    };
    for key in files.values() {
        assert!(keys.contains(key), "the volume mounts key {key}, missing from the Secret {secret}");
    }
    let mut from_files = BTreeSet::new();
    for var in container["env"].as_array().expect("env") {
        let name = str_at(var, "/name");
        if let Some(variable) = name.strip_suffix("_FILE") {
            let path = str_at(var, "/value");
            let file = path
                .strip_prefix(mount_path)
                .and_then(|rest| rest.strip_prefix('/'))
                .unwrap_or_else(|| panic!("{name}={path} is not under the secret mount {mount_path}"));
            let key = files.get(file).unwrap_or_else(|| panic!("{name}: no file {file} in the secret mount"));
            assert_eq!(key, variable, "{name} names the file of another key");
            from_files.insert(variable.to_owned());
        }
    }
    from_files
}

/// A docker compose service's `environment` map, a YAML merge key (`<<: *worker-env`) applied
/// whether or not the YAML parser applied it already.
fn compose_environment(environment: &Value) -> BTreeMap<String, String> {
    let map = environment.as_object().unwrap_or_else(|| panic!("environment as a map: {environment}"));
    let mut env = map.get("<<").map(compose_environment).unwrap_or_default();
    for (name, value) in map {
        if name != "<<" {
            let value = value.as_str().unwrap_or_else(|| panic!("{name}: not a string (quote it)"));
            env.insert(name.clone(), value.to_owned());
        }
    }
    env
}

/// What the worker's and the console's containers both keep (`sc` is the container's
/// securityContext): a read-only root, no privilege escalation, every capability dropped, memory
/// requested and limited, CPU requested.
fn assert_hardened(sc: &Value, container: &Value) {
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert!(sc["capabilities"]["drop"].as_array().unwrap().contains(&json!("ALL")));
    for kind in ["requests", "limits"] {
        assert!(container["resources"][kind]["memory"].is_string(), "resources.{kind}.memory");
    }
    assert!(container["resources"]["requests"]["cpu"].is_string(), "resources.requests.cpu");
}

/// `container`'s volume mount at `path`, if any.
fn mount_at<'a>(container: &'a Value, path: &str) -> Option<&'a Value> {
    container["volumeMounts"].as_array()?.iter().find(|m| m["mountPath"] == path)
}

fn yaml_files(relative: &str) -> Vec<String> {
    let mut files: Vec<String> = std::fs::read_dir(repo_path(relative))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .filter(|name| name.ends_with(".yaml") || name.ends_with(".yml"))
        .collect();
    files.sort();
    files
}

/// Bytes in a Kubernetes quantity such as `8Gi` or `512Mi`.
fn quantity_bytes(quantity: &str) -> u64 {
    let units = [("Ki", 1u64 << 10), ("Mi", 1 << 20), ("Gi", 1 << 30), ("Ti", 1 << 40)];
    for (suffix, factor) in units {
        if let Some(number) = quantity.strip_suffix(suffix) {
            return number.parse::<u64>().unwrap() * factor;
        }
    }
    quantity.parse().unwrap_or_else(|_| panic!("unsupported quantity {quantity}"))
}

fn labels(value: &Value) -> BTreeMap<String, String> {
    value
        .as_object()
        .unwrap_or_else(|| panic!("labels expected, got {value}"))
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
        .collect()
}

fn is_subset(small: &BTreeMap<String, String>, big: &BTreeMap<String, String>) -> bool {
    small.iter().all(|(k, v)| big.get(k) == Some(v))
}

#[test]
fn kustomization_lists_every_manifest_but_the_secret_example() {
    let kustomization = &yaml_documents(&format!("{MANIFESTS}/kustomization.yaml"))[0];
    assert_eq!(kustomization["kind"], "Kustomization");
    let listed: BTreeSet<String> = kustomization["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .map(|r| r.as_str().unwrap().to_owned())
        .collect();
    for file in &listed {
        assert!(repo_path(&format!("{MANIFESTS}/{file}")).is_file(), "kustomization lists missing {file}");
        assert!(!yaml_documents(&format!("{MANIFESTS}/{file}")).is_empty(), "{file} is empty");
    }
    // The example holds placeholders: applying it would overwrite the real credentials.
    let expected: BTreeSet<String> = yaml_files(MANIFESTS)
        .into_iter()
        .filter(|f| f != "kustomization.yaml" && f != "secret.example.yaml")
        .collect();
    assert_eq!(listed, expected, "kustomization.yaml must list every manifest except secret.example.yaml");
    let manifests = Manifests::load();
    for kind in
        ["ConfigMap", "Secret", "ScaledObject", "TriggerAuthentication", "PodDisruptionBudget", "Service"]
    {
        manifests.one(kind);
    }
    let deployments: BTreeSet<&str> =
        manifests.0.keys().filter(|(kind, _)| kind == "Deployment").map(|(_, name)| name.as_str()).collect();
    assert_eq!(deployments, BTreeSet::from([WORKER, CONSOLE]), "the worker's Deployment and the console's");
    let (file, _) = &manifests.0[&("Secret".to_owned(), "audio-worker".to_owned())];
    assert_eq!(file, "secret.example.yaml", "the only Secret is the example");
}

#[test]
fn probes_and_scraping_use_the_metrics_port() {
    let manifests = Manifests::load();
    let deployment = manifests.deployment();
    let container = manifests.container();
    let ports = container["ports"].as_array().expect("ports");
    let metrics = ports.iter().find(|p| p["name"] == "metrics").expect("a port named metrics");
    assert_eq!(metrics["containerPort"], 9090);
    let config = manifests.config();
    let metrics_addr = config.get("METRICS_ADDR").map_or("0.0.0.0:9090", String::as_str);
    assert!(metrics_addr.ends_with(":9090"), "METRICS_ADDR {metrics_addr} must listen on the metrics port");

    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert!(get["port"] == "metrics" || get["port"] == 9090, "{probe} must use the metrics port: {get}");
    }
    assert_ne!(container["livenessProbe"], container["readinessProbe"]);

    let annotations = &deployment["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], "9090");
    assert_eq!(annotations["prometheus.io/path"], "/metrics");

    let dockerfile = read("deploy/Dockerfile");
    assert!(dockerfile.lines().any(|l| l.trim() == "EXPOSE 9090"), "the Dockerfile must EXPOSE 9090");
}

#[test]
fn pods_get_more_time_to_stop_than_the_worker_takes_to_drain() {
    let manifests = Manifests::load();
    let pod = &manifests.deployment()["spec"]["template"]["spec"];
    let termination = pod["terminationGracePeriodSeconds"].as_u64().expect("terminationGracePeriodSeconds");
    let shutdown: u64 = manifests.config()["SHUTDOWN_GRACE_SECS"].parse().unwrap();
    assert!(
        termination > shutdown,
        "terminationGracePeriodSeconds ({termination}) must exceed SHUTDOWN_GRACE_SECS ({shutdown})"
    );
}

#[test]
fn pods_run_unprivileged_on_a_read_only_root() {
    let manifests = Manifests::load();
    let pod = &manifests.deployment()["spec"]["template"]["spec"];
    let container = manifests.container();
    let (pod_sc, sc) = (&pod["securityContext"], &container["securityContext"]);
    let run_as_non_root = sc["runAsNonRoot"].as_bool().or_else(|| pod_sc["runAsNonRoot"].as_bool());
    assert_eq!(run_as_non_root, Some(true));
    let uid = sc["runAsUser"].as_u64().or_else(|| pod_sc["runAsUser"].as_u64()).expect("runAsUser");
    assert_ne!(uid, 0);
    // The image's user and the pod's agree, so the image also runs unprivileged elsewhere.
    let dockerfile = read("deploy/Dockerfile");
    let image_user = dockerfile.lines().rev().find_map(|l| l.trim().strip_prefix("USER ")).expect("USER");
    assert_eq!(image_user.split(':').next().unwrap(), uid.to_string(), "Dockerfile USER vs runAsUser");
    assert_eq!(pod["automountServiceAccountToken"], false);
    assert_hardened(sc, container);

    // The spool directory is a writable emptyDir big enough for a full prefetch of the largest
    // allowed downloads.
    let config = manifests.config();
    let tmp_dir = config.get("WORKER_TMP_DIR").expect("WORKER_TMP_DIR must be set: the root is read-only");
    let mount =
        mount_at(container, tmp_dir).unwrap_or_else(|| panic!("nothing mounted at WORKER_TMP_DIR {tmp_dir}"));
    assert_ne!(mount["readOnly"], true);
    let volume =
        pod["volumes"].as_array().unwrap().iter().find(|v| v["name"] == mount["name"]).expect("spool volume");
    let size_limit = quantity_bytes(str_at(volume, "/emptyDir/sizeLimit"));
    let prefetch: u64 = config["WORKER_PREFETCH"].parse().unwrap();
    let max_audio: u64 = config["MAX_AUDIO_BYTES"].parse().unwrap();
    assert!(size_limit >= prefetch * max_audio, "spool sizeLimit below WORKER_PREFETCH x MAX_AUDIO_BYTES");
    let ephemeral_limit = quantity_bytes(str_at(container, "/resources/limits/ephemeral-storage"));
    assert!(ephemeral_limit >= size_limit, "ephemeral-storage limit below the spool's sizeLimit");
}

#[test]
fn configuration_comes_from_the_configmap_and_credentials_from_secret_files() {
    let manifests = Manifests::load();
    let container = manifests.container();
    let pod = &manifests.deployment()["spec"]["template"]["spec"];
    let config = manifests.config();
    let env_example = read("deploy/env.example");
    let documented: BTreeSet<&str> = env_example
        .lines()
        .filter_map(|l| l.trim_start_matches(['#', ' ']).split_once('='))
        .map(|(name, _)| name.trim())
        .collect();
    for key in config.keys() {
        assert!(documented.contains(key.as_str()), "ConfigMap key {key} is not in deploy/env.example");
        assert!(!CREDENTIALS.contains(&key.as_str()), "credential {key} in the ConfigMap");
    }
    for new in ["METRICS_ADDR", "AUDIO_URL_ALLOWED_HOSTS", "AUDIO_URL_PRIVATE_HOSTS", "MAX_AUDIO_BYTES"] {
        assert!(documented.contains(new), "{new} missing from deploy/env.example");
    }

    let secret_name = "audio-worker";
    let secret_keys = manifests.secret_keys(secret_name);
    assert!(!container["envFrom"].as_array().unwrap().iter().any(|f| f.get("secretRef").is_some()));

    // Credential files: each *_FILE points into the mounted Secret, at a key it has.
    let volume = pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v.pointer("/secret/secretName").and_then(Value::as_str) == Some(secret_name))
        .expect("the Secret mounted as a volume");
    let mount = container["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == volume["name"])
        .expect("secret volume mount");
    assert_eq!(mount["readOnly"], true);
    let mount_path = str_at(mount, "/mountPath");
    let files: BTreeMap<String, String> = match volume["secret"]["items"].as_array() {
        Some(items) => items.iter().map(|i| (str_at(i, "/path").into(), str_at(i, "/key").into())).collect(),
        None => secret_keys.iter().map(|k| (k.clone(), k.clone())).collect(),
    };
    for key in files.values() {
        assert!(secret_keys.contains(key), "the volume mounts key {key}, missing from the Secret");
    }
    let env = container["env"].as_array().expect("env");
    let mut from_files = BTreeSet::new();
    for var in env {
        let name = str_at(var, "/name");
        if let Some(credential) = name.strip_suffix("_FILE") {
            let path = str_at(var, "/value");
            let file = path
                .strip_prefix(mount_path)
                .and_then(|rest| rest.strip_prefix('/'))
                .unwrap_or_else(|| panic!("{name}={path} is not under the secret mount {mount_path}"));
            assert_eq!(files.get(file).map(String::as_str), Some(credential), "{name}");
            from_files.insert(credential);
        }
        if let Some(key) = var.pointer("/valueFrom/secretKeyRef") {
            assert_eq!(key["name"], secret_name);
            assert!(secret_keys.contains(str_at(key, "/key")), "{name} names a key missing from the Secret");
        }
        assert!(!(CREDENTIALS.contains(&name) && var.get("value").is_some()), "{name} as a plain value");
    }
    assert_eq!(from_files, BTreeSet::from(CREDENTIALS), "every credential is read from a file");

    // The example holds placeholders only.
    let secret = manifests.get("Secret", secret_name);
    for (key, value) in secret["stringData"].as_object().unwrap() {
        assert!(
            value.as_str().unwrap().contains("CHANGE-ME"),
            "{key} in the Secret example is not a placeholder"
        );
    }
}

#[test]
fn the_generation_service_is_an_allowed_private_host() {
    let config = Manifests::load().config();
    let base = url::Url::parse(&config["AUDIO_GENERATION_SERVICE_URL"]).unwrap();
    let host_port = format!("{}:{}", base.host_str().unwrap(), base.port_or_known_default().unwrap());
    let list = |var: &str| -> BTreeSet<String> {
        config[var].split(',').map(|h| h.trim().to_owned()).filter(|h| !h.is_empty()).collect()
    };
    let (allowed, private) = (list("AUDIO_URL_ALLOWED_HOSTS"), list("AUDIO_URL_PRIVATE_HOSTS"));
    // A cluster Service resolves to a private address, so the generation service needs both.
    assert!(allowed.contains(&host_port), "{host_port} not in AUDIO_URL_ALLOWED_HOSTS");
    assert!(private.contains(&host_port), "{host_port} not in AUDIO_URL_PRIVATE_HOSTS");
    assert!(private.is_subset(&allowed), "a private host that is not allowed is pointless");
}

#[test]
fn keda_scales_the_deployment_on_the_job_queue() {
    let manifests = Manifests::load();
    let deployment = manifests.deployment();
    let scaled = manifests.one("ScaledObject");
    let target = &scaled["spec"]["scaleTargetRef"];
    assert_eq!(target["name"], deployment["metadata"]["name"]);
    if let Some(kind) = target.get("kind") {
        assert_eq!(kind, "Deployment");
    }
    // KEDA owns the replica count: a `replicas` in the Deployment would be reset by every apply.
    assert!(deployment["spec"].get("replicas").is_none(), "leave replicas to KEDA");
    let (min, max) = (scaled["spec"]["minReplicaCount"].as_u64(), scaled["spec"]["maxReplicaCount"].as_u64());
    assert!(matches!((min, max), (Some(min), Some(max)) if 1 <= min && min <= max), "replica bounds");

    let triggers = scaled["spec"]["triggers"].as_array().unwrap();
    assert_eq!(triggers.len(), 1);
    let trigger = &triggers[0];
    assert_eq!(trigger["type"], "rabbitmq");
    let config = manifests.config();
    let job_queue = config.get("AMQP_JOB_QUEUE").map_or("audio.save", String::as_str);
    assert_eq!(trigger["metadata"]["queueName"], job_queue);
    assert_eq!(trigger["metadata"]["queueName"], "audio.save");
    assert_eq!(trigger["metadata"]["mode"], "QueueLength");
    assert!(str_at(trigger, "/metadata/value").parse::<u32>().unwrap() > 0);

    let auth = manifests.get("TriggerAuthentication", str_at(trigger, "/authenticationRef/name"));
    let refs = auth["spec"]["secretTargetRef"].as_array().unwrap();
    let host = refs.iter().find(|r| r["parameter"] == "host").expect("the host parameter from the Secret");
    assert_eq!(host["name"], "audio-worker");
    assert!(manifests.secret_keys("audio-worker").contains(str_at(host, "/key")));
}

#[test]
fn the_disruption_budget_selects_the_deployments_pods() {
    let manifests = Manifests::load();
    let deployment = manifests.deployment();
    let pod_labels = labels(&deployment["spec"]["template"]["metadata"]["labels"]);
    let selector = labels(&deployment["spec"]["selector"]["matchLabels"]);
    assert!(is_subset(&selector, &pod_labels), "the Deployment's selector must match its pods");
    let pdb = manifests.one("PodDisruptionBudget");
    let pdb_selector = labels(&pdb["spec"]["selector"]["matchLabels"]);
    assert!(!pdb_selector.is_empty());
    assert!(is_subset(&pdb_selector, &pod_labels), "the PDB selects no worker pod");
    assert!(pdb["spec"].get("maxUnavailable").is_some() || pdb["spec"].get("minAvailable").is_some());
}

// ---- The operator console (console.yaml, docker-compose.yml) ----

/// `audio-worker console` is a Deployment of its own: the worker's image, ConfigMap and secret
/// environment, one replica.
#[test]
fn the_console_runs_the_worker_image_with_the_workers_settings() {
    let manifests = Manifests::load();
    let (worker, console) = (manifests.container(), manifests.console_container());
    let command: Vec<&str> = console
        .get("command")
        .into_iter()
        .chain(console.get("args"))
        .flat_map(|list| list.as_array().expect("command and args are lists"))
        .map(|word| word.as_str().expect("command words are strings"))
        .collect();
    assert_eq!(command, ["audio-worker", "console"], "the console's command");
    assert_eq!(console["image"], worker["image"], "the console runs the worker's image");
    assert_eq!(manifests.console()["spec"]["replicas"], 1, "one console");
    // The same ConfigMap, and the worker's credential files and secret variables.
    assert_eq!(console["envFrom"], worker["envFrom"], "the console takes the worker's ConfigMap");
    let console_env = console["env"].as_array().expect("env");
    for var in worker["env"].as_array().expect("env") {
        assert!(console_env.contains(var), "the console lacks the worker's {var}");
    }
    let documented = documented_variables();
    for name in env_of(console).keys() {
        assert!(documented.contains(*name), "the console's {name} is not in deploy/env.example");
    }
    for name in [
        "CONSOLE_ADDR",
        "CONSOLE_TOKEN",
        "CONSOLE_TOKEN_FILE",
        "CONSOLE_READ_ONLY",
        "RABBITMQ_MANAGEMENT_URL",
    ] {
        assert!(documented.contains(name), "{name} missing from deploy/env.example");
    }
    if let Some(var) = env_of(console).get("CONSOLE_READ_ONLY") {
        assert!(matches!(str_at(var, "/value"), "true" | "false"), "CONSOLE_READ_ONLY: {var}");
    }
}

/// CONSOLE_ADDR listens on every interface, on the port the probes and the ClusterIP Service
/// use; /healthz (no login) is the probe; no scraping (the console serves no /metrics).
#[test]
fn the_console_listens_where_its_service_and_probes_point() {
    let manifests = Manifests::load();
    let console = manifests.console_container();
    let env = env_of(console);
    let addr = str_at(env.get("CONSOLE_ADDR").expect("CONSOLE_ADDR"), "/value");
    let (host, port) = addr.rsplit_once(':').expect("CONSOLE_ADDR is ip:port");
    assert_eq!(host, "0.0.0.0", "CONSOLE_ADDR: its default, 127.0.0.1, is unreachable from the Service");
    let port: u64 = port.parse().unwrap();
    assert_eq!(port, 8090);
    let ports = console["ports"].as_array().expect("ports");
    let http = ports.iter().find(|p| p["name"] == "http").expect("a port named http");
    assert_eq!(http["containerPort"].as_u64(), Some(port), "containerPort vs CONSOLE_ADDR");
    // A probe or a targetPort names the port or gives its number.
    let is_http = |target: &Value| target.as_str() == Some("http") || target.as_u64() == Some(port);
    for probe in ["livenessProbe", "readinessProbe"] {
        let get = &console[probe]["httpGet"];
        assert_eq!(get["path"], "/healthz", "{probe}: the one path without login");
        assert!(is_http(&get["port"]), "{probe} must use the http port: {get}");
    }

    let service = manifests.get("Service", CONSOLE);
    assert_eq!(service["spec"]["type"], "ClusterIP", "the console stays inside the cluster");
    let service_ports = service["spec"]["ports"].as_array().expect("Service ports");
    assert_eq!(service_ports.len(), 1);
    assert_eq!(service_ports[0]["port"].as_u64(), Some(port), "kubectl port-forward svc/{CONSOLE} {port}");
    assert!(is_http(&service_ports[0]["targetPort"]), "targetPort: {}", service_ports[0]);
    let console_pods = labels(&manifests.console()["spec"]["template"]["metadata"]["labels"]);
    let worker_pods = labels(&manifests.deployment()["spec"]["template"]["metadata"]["labels"]);
    let selector = labels(&service["spec"]["selector"]);
    assert!(!selector.is_empty() && is_subset(&selector, &console_pods), "the Service selects the console");
    assert!(!is_subset(&selector, &worker_pods), "the console's Service must not send traffic to workers");

    let annotations = &manifests.console()["spec"]["template"]["metadata"]["annotations"];
    assert_ne!(annotations["prometheus.io/scrape"], "true", "the console serves no /metrics");
}

/// The operator's token is a file of the mounted Secret (CONSOLE_TOKEN_FILE), as are the
/// credentials; never in the environment or the ConfigMap, and not given to the worker's pods.
#[test]
fn the_console_reads_its_token_and_the_credentials_from_secret_files() {
    let manifests = Manifests::load();
    let console = manifests.console_container();
    let pod = &manifests.console()["spec"]["template"]["spec"];
    let secret_keys = manifests.secret_keys(SECRET);
    assert!(secret_keys.contains(CONSOLE_TOKEN), "the Secret example has no {CONSOLE_TOKEN}");
    let from_files = secret_files(pod, console, SECRET, &secret_keys);
    for variable in CREDENTIALS.into_iter().chain([CONSOLE_TOKEN]) {
        assert!(from_files.contains(variable), "the console must read {variable} from a secret file");
    }
    let env = env_of(console);
    assert!(!env.contains_key(CONSOLE_TOKEN), "the token comes from CONSOLE_TOKEN_FILE, not the environment");
    for (name, var) in &env {
        assert!(!(CREDENTIALS.contains(name) && var.get("value").is_some()), "{name} as a plain value");
        if let Some(key) = var.pointer("/valueFrom/secretKeyRef") {
            assert_eq!(key["name"], SECRET);
            assert!(secret_keys.contains(str_at(key, "/key")), "{name} names a key missing from the Secret");
        }
    }
    assert!(!console["envFrom"].as_array().unwrap().iter().any(|f| f.get("secretRef").is_some()));
    assert!(!manifests.config().contains_key(CONSOLE_TOKEN), "the token in the ConfigMap");

    // The worker mounts only the keys it reads.
    let worker_pod = &manifests.deployment()["spec"]["template"]["spec"];
    let worker_gets_the_token = worker_pod["volumes"].as_array().unwrap().iter().any(|volume| {
        volume.pointer("/secret/secretName").and_then(Value::as_str) == Some(SECRET)
            && volume["secret"]["items"]
                .as_array()
                .is_none_or(|items| items.iter().any(|item| item["key"] == CONSOLE_TOKEN))
    });
    assert!(!worker_gets_the_token, "the worker's pods must not get the console's token");
    assert!(!env_of(manifests.container()).keys().any(|name| name.starts_with("CONSOLE_")));
}

/// The console's pod and container run as the worker's do: unprivileged, read-only root, no
/// capabilities, no service account token, bounded resources, and writable emptyDirs only where
/// the worker's configuration (which it loads) needs one.
#[test]
fn the_console_is_hardened_like_the_worker() {
    let manifests = Manifests::load();
    let worker_pod = &manifests.deployment()["spec"]["template"]["spec"];
    let pod = &manifests.console()["spec"]["template"]["spec"];
    let (worker, console) = (manifests.container(), manifests.console_container());
    assert_eq!(pod["securityContext"], worker_pod["securityContext"], "the pod's securityContext");
    assert_eq!(console["securityContext"], worker["securityContext"], "the container's securityContext");
    assert_eq!(pod["automountServiceAccountToken"], false);
    // What the worker's own test asks of it, in case both drift together.
    let (pod_sc, sc) = (&pod["securityContext"], &console["securityContext"]);
    let run_as_non_root = sc["runAsNonRoot"].as_bool().or_else(|| pod_sc["runAsNonRoot"].as_bool());
    assert_eq!(run_as_non_root, Some(true));
    let uid = sc["runAsUser"].as_u64().or_else(|| pod_sc["runAsUser"].as_u64()).expect("runAsUser");
    assert_ne!(uid, 0);
    assert_hardened(sc, console);

    // The configuration insists on a writable WORKER_TMP_DIR, and the root is read-only.
    let config = manifests.config();
    let tmp_dir = config.get("WORKER_TMP_DIR").expect("WORKER_TMP_DIR");
    let mount = mount_at(console, tmp_dir).unwrap_or_else(|| {
        panic!("the console loads the worker's configuration: mount WORKER_TMP_DIR {tmp_dir}")
    });
    assert_ne!(mount["readOnly"], true);
    let volumes = pod["volumes"].as_array().unwrap();
    let spool = volumes.iter().find(|v| v["name"] == mount["name"]).expect("the WORKER_TMP_DIR volume");
    assert!(spool["emptyDir"].is_object(), "WORKER_TMP_DIR on an emptyDir");
    let mut empty_dirs = 0;
    for volume in volumes.iter().filter(|v| v.get("emptyDir").is_some()) {
        empty_dirs += quantity_bytes(str_at(volume, "/emptyDir/sizeLimit"));
    }
    let ephemeral_limit = quantity_bytes(str_at(console, "/resources/limits/ephemeral-storage"));
    assert!(ephemeral_limit >= empty_dirs, "ephemeral-storage limit below the emptyDirs' sizeLimits");
}

/// The worker's selectors (its Deployment's, the PDB's, the topology spread's) never pick the
/// console's pod, nor the console's a worker; KEDA scales the worker only.
#[test]
fn the_workers_selectors_leave_the_console_alone() {
    let manifests = Manifests::load();
    let (worker, console) = (manifests.deployment(), manifests.console());
    let pod_labels = |deployment: &Value| labels(&deployment["spec"]["template"]["metadata"]["labels"]);
    let (worker_pods, console_pods) = (pod_labels(worker), pod_labels(console));
    let console_selector = labels(&console["spec"]["selector"]["matchLabels"]);
    assert!(is_subset(&console_selector, &console_pods), "the console's selector must match its pod");
    assert!(!is_subset(&console_selector, &worker_pods), "the console's Deployment must not adopt workers");

    let pdb = manifests.one("PodDisruptionBudget");
    let mut worker_selectors = vec![
        ("the worker's Deployment", labels(&worker["spec"]["selector"]["matchLabels"])),
        ("the PodDisruptionBudget", labels(&pdb["spec"]["selector"]["matchLabels"])),
    ];
    let spread = worker["spec"]["template"]["spec"]["topologySpreadConstraints"].as_array();
    for constraint in spread.into_iter().flatten() {
        worker_selectors
            .push(("a topology spread constraint", labels(&constraint["labelSelector"]["matchLabels"])));
    }
    for (what, selector) in worker_selectors {
        assert!(is_subset(&selector, &worker_pods), "{what} must select the worker's pods");
        assert!(!is_subset(&selector, &console_pods), "{what} must not select the console's pod");
    }

    let target = &manifests.one("ScaledObject")["spec"]["scaleTargetRef"];
    assert_eq!(target["name"], WORKER, "KEDA scales the worker, never the console");
    assert_eq!(console["spec"]["replicas"], 1, "the console keeps its one replica");
}

/// docker compose runs the console from the worker's image with the worker's environment,
/// listening on every interface of its container but published on the host's loopback only.
#[test]
fn compose_runs_the_console_beside_the_worker_on_localhost_only() {
    let compose = yaml_documents("docker-compose.yml").remove(0);
    let services = &compose["services"];
    let (worker, console) = (&services["worker"], &services["console"]);
    assert!(console.is_object(), "docker-compose.yml has no console service");
    assert_eq!(console["image"], worker["image"]);
    assert_eq!(console["build"], worker["build"]);
    assert_eq!(console["command"], json!(["audio-worker", "console"]));
    assert_eq!(console["depends_on"], worker["depends_on"], "the console needs what the worker needs");

    let (worker_env, console_env) =
        (compose_environment(&worker["environment"]), compose_environment(&console["environment"]));
    for (name, value) in &worker_env {
        assert_eq!(console_env.get(name), Some(value), "the console's {name} is not the worker's");
    }
    assert!(console_env.contains_key(CONSOLE_TOKEN) || console_env.contains_key("CONSOLE_TOKEN_FILE"));
    let addr = console_env.get("CONSOLE_ADDR").expect("CONSOLE_ADDR");
    let (host, port) = addr.rsplit_once(':').expect("CONSOLE_ADDR is ip:port");
    assert_eq!(host, "0.0.0.0", "CONSOLE_ADDR: its default, 127.0.0.1, is unreachable from the host");
    let published = console["ports"].as_array().expect("ports");
    assert!(!published.is_empty(), "the console's port is published");
    for mapping in published {
        assert_eq!(
            mapping.as_str().expect("ports in the short syntax"),
            format!("127.0.0.1:{port}:{port}"),
            "the console is published on the host's loopback only"
        );
    }
    if let Some(management) = console_env.get("RABBITMQ_MANAGEMENT_URL") {
        let management = url::Url::parse(management).unwrap();
        let host = management.host_str().unwrap();
        let image = str_at(&services[host], "/image");
        assert!(
            image.contains("management"),
            "RABBITMQ_MANAGEMENT_URL: {host} runs {image}, no management plugin"
        );
    }
}

// ---- AsyncAPI ----

/// The AsyncAPI document with every `$ref` replaced by what it points to: `#/…` pointers within
/// the document, and relative file paths (resolved from `docs/`).
fn asyncapi_resolved() -> (Value, Value) {
    let raw = yaml_documents(ASYNCAPI).remove(0);
    let resolved = resolve(&raw, &raw, 0);
    (raw, resolved)
}

fn resolve(value: &Value, root: &Value, depth: usize) -> Value {
    assert!(depth < 32, "$ref cycle");
    match value {
        Value::Object(object) => {
            if let Some(target) = object.get("$ref").and_then(Value::as_str) {
                let pointed = if let Some(pointer) = target.strip_prefix('#') {
                    root.pointer(pointer).unwrap_or_else(|| panic!("dangling $ref {target}")).clone()
                } else {
                    let file = repo_path("docs").join(target);
                    let text =
                        std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("$ref {target}: {e}"));
                    serde_json::from_str(&text).unwrap()
                };
                return resolve(&pointed, root, depth + 1);
            }
            Value::Object(object.iter().map(|(k, v)| (k.clone(), resolve(v, root, depth))).collect())
        }
        Value::Array(items) => Value::Array(items.iter().map(|v| resolve(v, root, depth)).collect()),
        other => other.clone(),
    }
}

/// The schema of a payload, bare or in a Multi Format Schema Object.
fn payload_schema(message: &Value) -> &Value {
    let payload = &message["payload"];
    payload.get("schema").filter(|_| payload.get("schemaFormat").is_some()).unwrap_or(payload)
}

fn schema_file(name: &str) -> Value {
    serde_json::from_str(&read(&format!("schemas/{name}"))).unwrap()
}

fn validator(schema: &Value) -> jsonschema::Validator {
    jsonschema::options()
        .should_validate_formats(true)
        .build(schema)
        .unwrap_or_else(|e| panic!("{e}: {schema}"))
}

fn assert_valid(validator: &jsonschema::Validator, instance: &Value, what: &str) {
    let errors: Vec<String> = validator.iter_errors(instance).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{what} does not validate: {errors:?}\n{instance:#}");
}

/// Channels by address.
fn channels(document: &Value) -> BTreeMap<String, Vec<&Value>> {
    let mut by_address: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for channel in document["channels"].as_object().unwrap().values() {
        let address = channel["address"].as_str().unwrap_or("(dynamic)").to_owned();
        by_address.entry(address).or_default().push(channel);
    }
    by_address
}

fn message_names(channel: &Value) -> BTreeSet<String> {
    channel["messages"].as_object().unwrap().values().map(|m| str_at(m, "/name").to_owned()).collect()
}

#[test]
fn asyncapi_describes_the_topology() {
    let (raw, document) = asyncapi_resolved();
    assert!(str_at(&raw, "/asyncapi").starts_with("3."), "AsyncAPI 3.x");
    let channels = channels(&document);
    let queues = [
        "audio.save",
        "audio.save.retry.{n}",
        "audio.save.dlq",
        "audio.save.batch",
        "audio.save.items",
        "audio.save.batch.progress",
        "audio.url.refresh",
    ];
    for address in queues.iter().chain(&["{eventType}"]) {
        assert!(channels.contains_key(*address), "no channel {address}; have {:?}", channels.keys());
    }
    let amqp = |channel: &Value| channel["bindings"]["amqp"].clone();
    for channel in channels.values().flatten().filter(|c| c.get("bindings").is_some()) {
        assert_eq!(amqp(channel)["bindingVersion"], "0.3.0");
    }

    // Jobs: routing key audio.save on the direct exchange audio.jobs, into the quorum queue.
    let save = &channels["audio.save"];
    let exchange = save.iter().map(|c| amqp(c)).find(|b| b["is"] == "routingKey").expect("job routing key");
    assert_eq!(exchange["exchange"]["name"], "audio.jobs");
    assert_eq!(exchange["exchange"]["type"], "direct");
    assert_eq!(exchange["exchange"]["durable"], true);
    let queue = save.iter().map(|c| amqp(c)).find(|b| b["is"] == "queue").expect("job queue");
    assert_eq!(queue["queue"]["name"], "audio.save");
    for address in queues {
        let binding = channels[address].iter().map(|c| amqp(c)).find(|b| b["is"] == "queue").unwrap();
        assert_eq!(binding["queue"]["name"], address);
        assert_eq!(binding["queue"]["durable"], true, "{address}");
        assert_eq!(binding["x-queue-arguments"]["x-queue-type"], "quorum", "{address}");
    }
    let retry = &amqp(channels["audio.save.retry.{n}"][0])["x-queue-arguments"];
    assert_eq!(retry["x-dead-letter-exchange"], "audio.jobs");
    assert_eq!(retry["x-dead-letter-routing-key"], "audio.save");
    assert!(channels["audio.save.retry.{n}"][0]["parameters"]["n"].is_object());
    // Batches, their items and URL refresh requests are routed by the job exchange with the
    // queue's own name (the progress queue is reached through the default exchange).
    for address in ["audio.save.batch", "audio.save.items", "audio.url.refresh"] {
        let binding = channels[address].iter().map(|c| amqp(c)).find(|b| b["is"] == "queue").unwrap();
        assert_eq!(binding["x-bound-to"]["exchange"], "audio.jobs", "{address}");
        assert_eq!(binding["x-bound-to"]["routingKey"], address, "{address}");
    }
    for address in ["audio.save.batch", "audio.url.refresh"] {
        let exchange =
            channels[address].iter().map(|c| amqp(c)).find(|b| b["is"] == "routingKey").expect(address);
        assert_eq!(exchange["exchange"]["name"], "audio.jobs", "{address}");
    }

    // Events: audio.saved, audio.failed and audio.batch.completed on the topic exchange
    // audio.events, and as replies (a job's outcome, a batch's completion).
    let events = channels["{eventType}"][0];
    assert_eq!(amqp(events)["exchange"]["name"], "audio.events");
    assert_eq!(amqp(events)["exchange"]["type"], "topic");
    let event_names = BTreeSet::from(
        ["audio.saved", "audio.failed", audio_worker::batch::COMPLETED_ROUTING_KEY].map(String::from),
    );
    assert_eq!(message_names(events), event_names);
    let routing_keys: BTreeSet<String> = events["parameters"]["eventType"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(routing_keys, event_names);
    let replies = |name: &str| message_names(&document["channels"][name]);
    let job_events = BTreeSet::from(["audio.saved", "audio.failed"].map(String::from));
    assert_eq!(replies("replies"), job_events, "a job's reply_to gets its outcome");
    assert_eq!(replies("batchReplies"), BTreeSet::from(["audio.batch.completed".to_owned()]));
    assert_eq!(
        replies("urlRefreshReplies"),
        BTreeSet::from([audio_worker::refresh::REFRESHED_TYPE.to_owned()])
    );
    assert_eq!(channels["(dynamic)"].len(), 3, "the three reply_to channels");

    // Operations: receive jobs, send events, replies, delay-queue copies and dead letters.
    let operations = raw["operations"].as_object().unwrap();
    let mut seen = BTreeSet::new();
    for (name, operation) in operations {
        let channel = document.pointer(&str_at(operation, "/channel/$ref")[1..]).unwrap();
        let address = channel["address"].as_str().unwrap_or("(dynamic)").to_owned();
        seen.insert((str_at(operation, "/action").to_owned(), address));
        for message in operation["messages"].as_array().unwrap() {
            let target = str_at(message, "/$ref");
            assert!(
                target.starts_with(str_at(operation, "/channel/$ref")),
                "{name}: {target} not of its channel"
            );
        }
    }
    for (action, address) in [
        ("receive", "audio.save"),
        ("send", "{eventType}"),
        ("send", "audio.save.retry.{n}"),
        ("send", "audio.save.dlq"),
        ("receive", "audio.save.batch"),
        ("send", "audio.save.items"),
        ("receive", "audio.save.items"),
        ("send", "audio.save.batch.progress"),
        ("receive", "audio.save.batch.progress"),
        ("receive", "audio.url.refresh"),
    ] {
        assert!(seen.contains(&(action.into(), address.into())), "no {action} operation on {address}");
    }
    assert_eq!(raw["operations"]["receiveJob"]["bindings"]["amqp"]["ack"], true);
    assert_eq!(raw["operations"]["sendEvent"]["bindings"]["amqp"]["mandatory"], true);
}

#[test]
fn asyncapi_documents_the_headers_the_code_sets() {
    use audio_worker::amqp::headers::{FAILURE_HEADERS, HEADER_DELIVERY};
    let (_, document) = asyncapi_resolved();
    let messages = &document["components"]["messages"];
    // Header names declared anywhere in a message's headers schema (through allOf).
    fn names(schema: &Value, into: &mut BTreeSet<String>) {
        if let Some(properties) = schema["properties"].as_object() {
            into.extend(properties.keys().cloned());
        }
        for part in schema["allOf"].as_array().into_iter().flatten() {
            names(part, into);
        }
    }
    let headers = |message: &str| {
        let mut set = BTreeSet::new();
        names(&messages[message]["headers"], &mut set);
        set
    };
    let dead_letter = headers("deadLetter");
    use audio_worker::amqp::headers::{HEADER_GENERATION, HEADER_REPLAYED_AT};
    for header in FAILURE_HEADERS.into_iter().chain([HEADER_REPLAYED_AT, HEADER_GENERATION]) {
        assert!(dead_letter.contains(header), "dead-letter header {header} undocumented");
    }
    assert!(headers("parkedJob").contains(HEADER_DELIVERY));
    for message in ["saveAudioJob", "audioSaved", "audioFailed"] {
        assert!(headers(message).contains("traceparent"), "{message}: traceparent undocumented");
    }
    for message in ["saveAudioJob", "audioSaved", "audioFailed"] {
        assert!(str_at(&messages[message], "/correlationId/location").contains("correlation_id"));
    }
    let reply = &document["operations"]["receiveJob"]["reply"]["address"]["location"];
    assert!(reply.as_str().unwrap().contains("reply_to"));
}

#[test]
fn asyncapi_payloads_are_the_schema_files_and_its_examples_validate() {
    let (raw, document) = asyncapi_resolved();
    let expected = [
        ("saveAudioJob", "save-audio-job.v1.json"),
        ("audioSaved", "audio-saved.v1.json"),
        ("audioFailed", "audio-failed.v1.json"),
        ("saveAudioBatch", "save-audio-batch.v1.json"),
        ("batchItemJob", "save-audio-job.v1.json"),
        ("audioBatchCompleted", "audio-batch-completed.v1.json"),
        ("urlRefreshRequest", "url-refresh-request.v1.json"),
        ("urlRefreshed", "url-refresh-reply.v1.json"),
    ];
    for (message, file) in expected {
        assert_eq!(
            payload_schema(&document["components"]["messages"][message]),
            &schema_file(file),
            "{message}"
        );
    }
    // Every schema file is part of the contract.
    let used: BTreeSet<&str> = expected.iter().map(|(_, f)| *f).collect();
    for entry in std::fs::read_dir(repo_path("schemas")).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        assert!(used.contains(name.as_str()), "schemas/{name} is not in {ASYNCAPI}");
    }

    let mut examples = 0;
    for (name, message) in document["components"]["messages"].as_object().unwrap() {
        let payload = validator(payload_schema(message));
        let headers = message.get("headers").map(validator);
        for example in message["examples"].as_array().into_iter().flatten() {
            let what = format!("{name} example {}", example["name"]);
            assert_valid(&payload, &example["payload"], &what);
            if let (Some(headers), Some(instance)) = (&headers, example.get("headers")) {
                assert_valid(headers, instance, &format!("{what} headers"));
            }
            examples += 1;
        }
    }
    assert!(examples >= 9, "examples for the job, the batch, the events and the URL refresh");
    // The sample job in the document is the one in deploy/sample.
    let sample: Value = serde_json::from_str(&read("deploy/sample/sample-job.json")).unwrap();
    assert_eq!(raw["components"]["messages"]["saveAudioJob"]["examples"][0]["payload"], sample);
}

/// The internal progress report is documented field for field: a saved and a failed report show,
/// between them, exactly the properties of the document's `batchItemProgress` schema, and both
/// validate.
#[test]
fn asyncapi_describes_the_internal_progress_report() {
    use audio_worker::batch::{ItemProgress, ItemState};
    let (_, document) = asyncapi_resolved();
    let schema = &document["components"]["messages"]["batchItemProgress"]["payload"];
    let item = |index| audio_worker::job::BatchItem { batch_id: uuid::Uuid::new_v4(), index };
    let saved = ItemProgress {
        state: ItemState::Saved,
        version: Some(1),
        key: Some("c/u/audio/a.wav".into()),
        url: Some("https://media.example.com/c/u/audio/a.wav?X-Amz-Signature=00".into()),
        url_expires_at: Some(Utc::now()),
        content_type: Some("audio/wav".into()),
        size: Some(44),
        duration: Some(1.5),
        title: Some("Hello".into()),
        stage: None,
        reason: None,
        ..ItemProgress::failed(item(0), Some("a".into()), "", "")
    };
    let failed = ItemProgress::failed(item(1), None, "download", "HTTP 404");
    let validator = validator(schema);
    let mut union = BTreeSet::new();
    for report in [&saved, &failed] {
        let report = serde_json::to_value(report).unwrap();
        assert_valid(&validator, &report, "a progress report");
        union.extend(report.as_object().unwrap().keys().cloned());
    }
    let documented: BTreeSet<String> = schema["properties"].as_object().unwrap().keys().cloned().collect();
    assert_eq!(union, documented);
}

/// A job the worker accepts, parsed through its own code.
fn parsed_job() -> audio_worker::job::Job {
    let body = read("deploy/sample/sample-job.json");
    let base = url::Url::parse("http://audio-generation-factory:3000").unwrap();
    SaveAudioJob::parse(body.as_bytes(), &UrlPolicy::for_base(base)).expect("the sample job parses")
}

#[test]
fn the_sample_job_and_the_events_the_code_builds_validate() {
    let job_schema = validator(&schema_file("save-audio-job.v1.json"));
    let saved_schema = validator(&schema_file("audio-saved.v1.json"));
    let failed_schema = validator(&schema_file("audio-failed.v1.json"));

    let sample: Value = serde_json::from_str(&read("deploy/sample/sample-job.json")).unwrap();
    assert_valid(&job_schema, &sample, "deploy/sample/sample-job.json");

    let job = parsed_job();
    let object = StoredObject {
        bucket: "audio-assets".into(),
        key: format!("acme/user_1/audio/{}.wav", job.asset_id),
        size: 11_062,
        content_type: "audio/wav".into(),
        etag: "9b2cf535f27731c974343645a3985328".into(),
        sha256: "0".repeat(64),
        measured_duration: Some(1.6),
        analysis: Some(audio_worker::audio::measure::AnalysisOutcome::Done(
            audio_worker::audio::analysis::Analysis {
                loudness: audio_worker::audio::analysis::Loudness {
                    integrated_lufs: Some(-23.1),
                    range_lu: Some(2.5),
                    true_peak_dbtp: Some(-1.2),
                },
                silence: audio_worker::audio::analysis::Silence {
                    leading_s: 0.2,
                    trailing_s: 0.4,
                    threshold_dbfs: -60.0,
                },
                clipped_samples: 0,
                sample_rate: 24_000,
                channels: 1,
                bits_per_sample: Some(16),
                codec: "pcm_s16le".into(),
                quality_rules_passed: Some(vec!["max_clipped_samples=0".into()]),
            },
        )),
        url: format!(
            "https://media.example.com/audio-assets/acme/user_1/audio/{}.wav?X-Amz-Signature=00",
            job.asset_id
        ),
        url_expires_at: Some(Utc::now()),
        delivery: audio_worker::delivery::DeliveryMode::Presigned,
        waveform: None,
        renditions: Vec::new(),
        renditions_skipped: Vec::new(),
    };
    let mut object = object;
    let beside = |suffix: &str, content_type: &str, size: u64| audio_worker::asset::DerivedObject {
        key: format!("acme/user_1/audio/{}.{suffix}", job.asset_id),
        content_type: content_type.into(),
        size,
        sha256: "1".repeat(64),
        url: format!(
            "https://media.example.com/audio-assets/acme/user_1/audio/{}.{suffix}?X-Amz-Signature=01",
            job.asset_id
        ),
        url_expires_at: Some(Utc::now()),
    };
    object.attach(
        &audio_worker::audio::encoded::EncodedKind::Waveform(audio_worker::audio::encoded::WaveformInfo {
            channels: 1,
            sample_rate: 24_000,
            samples_per_pixel: 256,
            bits: 16,
            length: 150,
        }),
        beside("peaks.json", "application/json", 1_800),
    );
    object.attach(
        &audio_worker::audio::encoded::EncodedKind::Rendition(audio_worker::audio::encoded::RenditionInfo {
            rendition: audio_worker::audio::rendition::Rendition::Flac,
            bitrate_kbps: None,
        }),
        beside("flac.flac", "audio/flac", 6_000),
    );
    object.attach(
        &audio_worker::audio::encoded::EncodedKind::Rendition(audio_worker::audio::encoded::RenditionInfo {
            rendition: audio_worker::audio::rendition::Rendition::Vorbis,
            bitrate_kbps: Some(64),
        }),
        beside("vorbis.ogg", "audio/ogg", 2_000),
    );
    let saved = AudioSaved::new(&job, &object, &CatalogEntry { version: 3, created_at: Utc::now() });
    let saved_json = serde_json::to_value(&saved).unwrap();
    assert_eq!(saved_json["waveform"]["length"], 150);
    assert_eq!(saved_json["renditions"][0]["bytes_saved"], 11_062 - 6_000);
    assert_valid(&saved_schema, &saved_json, "AudioSaved::new (waveform and renditions)");
    object.waveform = Some(audio_worker::asset::WaveformOutcome::Skipped {
        skipped: "no decoder for this codec (opus)".into(),
    });
    object.renditions.clear();
    object.renditions_skipped = vec![audio_worker::audio::rendition::Skipped {
        name: "flac".into(),
        reason: "the source is mp3".into(),
    }];
    let saved = AudioSaved::new(&job, &object, &CatalogEntry { version: 3, created_at: Utc::now() });
    let saved = serde_json::to_value(&saved).unwrap();
    assert_valid(&saved_schema, &saved, "AudioSaved::new");

    let failed =
        AudioFailed::new(Some(&job), None, "fp", Stage::Download, ErrorClass::Permanent, "HTTP 404", 1);
    assert_valid(&failed_schema, &serde_json::to_value(&failed).unwrap(), "AudioFailed::new (parsed job)");
    let unparsed = AudioFailed::new(
        None,
        Some("not-a-uuid".into()),
        "fp",
        Stage::Parse,
        ErrorClass::Permanent,
        "bad JSON",
        1,
    );
    assert_valid(&failed_schema, &serde_json::to_value(&unparsed).unwrap(), "AudioFailed::new (no job)");
    let nothing = AudioFailed::new(None, None, "fp", Stage::Parse, ErrorClass::Permanent, "not JSON", 1);
    assert_valid(&failed_schema, &serde_json::to_value(&nothing).unwrap(), "AudioFailed::new (no asset id)");

    // And what the schemas must refuse.
    let mut no_asset = sample.clone();
    no_asset.as_object_mut().unwrap().remove("asset_id");
    assert!(!job_schema.is_valid(&no_asset), "a job without asset_id");
    let mut bad_uuid = sample.clone();
    bad_uuid["asset_id"] = json!("3b0f6a8e");
    assert!(!job_schema.is_valid(&bad_uuid), "a job whose asset_id is not a UUID (formats are checked)");
    let mut bad_tenant = sample.clone();
    bad_tenant["customer_id"] = json!("../other");
    assert!(!job_schema.is_valid(&bad_tenant), "a customer_id that leaves its key segment");
    let mut wrong_type = saved.clone();
    wrong_type["event_type"] = json!("audio.failed");
    assert!(!saved_schema.is_valid(&wrong_type), "audio.saved with another event_type");
    let mut wrong_type = serde_json::to_value(&failed).unwrap();
    wrong_type["event_type"] = json!("audio.saved");
    assert!(!failed_schema.is_valid(&wrong_type), "audio.failed with another event_type");
    let mut no_storage = saved;
    no_storage.as_object_mut().unwrap().remove("storage");
    assert!(!saved_schema.is_valid(&no_storage), "audio.saved without storage");
}

/// `docker build` copies only what the Dockerfile names: everything cargo needs to build the
/// binaries must be among it (a target file Cargo.toml declares, a file `include_str!` reads).
#[test]
fn the_docker_build_copies_everything_cargo_needs() {
    let dockerfile = read("deploy/Dockerfile");
    let copied: BTreeSet<String> = dockerfile
        .lines()
        .filter_map(|line| line.strip_prefix("COPY "))
        .filter(|args| !args.starts_with("--from"))
        .flat_map(|args| {
            let words: Vec<&str> = args.split_whitespace().collect();
            words[..words.len().saturating_sub(1)]
                .iter()
                .map(|w| w.trim_end_matches('/').to_owned())
                .collect::<Vec<_>>()
        })
        .collect();
    let mut needed: BTreeSet<String> = ["Cargo.toml", "Cargo.lock", "src"].map(String::from).into();
    let manifest = read("Cargo.toml");
    if manifest.contains("[[bench]]") {
        needed.insert("benches".into());
    }
    // Top-level folders of every `include_str!("../…")` in src/.
    let mut sources = vec![repo_path("src")];
    while let Some(dir) = sources.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let path = entry.path();
            if path.is_dir() {
                sources.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                for include in text.split("include_str!(\"").skip(1) {
                    let relative = include.split('"').next().unwrap();
                    let resolved = path.parent().unwrap().join(relative);
                    let resolved = resolved.canonicalize().unwrap();
                    let top = resolved.strip_prefix(repo_path("").canonicalize().unwrap()).unwrap();
                    needed
                        .insert(top.components().next().unwrap().as_os_str().to_string_lossy().into_owned());
                }
            }
        }
    }
    let missing: Vec<&String> = needed.difference(&copied).collect();
    assert!(missing.is_empty(), "deploy/Dockerfile does not COPY {missing:?} (it copies {copied:?})");
}

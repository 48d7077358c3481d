//! Off-site copies against a real S3 API server (moto, started per test on loopback),
//! checked from the outside with boto3.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::proxy::{Fault, Proxy};
use crate::support::*;

/// moto's S3 server on a free loopback port.
pub struct Moto {
    child: Child,
    pub addr: SocketAddr,
}

impl Moto {
    pub fn start() -> Moto {
        let ok = Command::new("python3").args(["-c", "import moto.server, boto3"]).status().is_ok_and(|s| s.success());
        assert!(ok, "these tests need moto's S3 server: pip install 'moto[server]' (.ci/run installs it)");
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
        let child = Command::new("python3")
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto starts");
        let started = Instant::now();
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(started.elapsed() < Duration::from_secs(30), "moto did not listen on {addr}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Moto { child, addr }
    }

    /// Runs `code` with `s3`, a boto3 client of this server; returns its stdout.
    pub fn py(&self, code: &str) -> String {
        let script = format!(
            "import boto3, hashlib, json, sys\n\
             s3 = boto3.client('s3', endpoint_url='http://{}', region_name='us-east-1',\n\
             \x20   aws_access_key_id='test', aws_secret_access_key='test')\n{code}\n",
            self.addr
        );
        let out = Command::new("python3").args(["-c", &script]).output().expect("python3");
        assert!(out.status.success(), "boto3: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).expect("utf-8")
    }

    pub fn create_bucket(&self, bucket: &str) {
        self.py(&format!("s3.create_bucket(Bucket='{bucket}')"));
    }

    /// Size, SHA-256 of the content and user metadata of an object; `None` if absent.
    pub fn object(&self, bucket: &str, key: &str) -> Option<(u64, String, serde_json::Value)> {
        let out = self.py(&format!(
            "try:\n    o = s3.get_object(Bucket='{bucket}', Key='{key}')\nexcept s3.exceptions.NoSuchKey:\n    print('null'); sys.exit(0)\n\
             body = o['Body'].read()\nprint(json.dumps([len(body), hashlib.sha256(body).hexdigest(), o['Metadata']]))"
        ));
        let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
        if v.is_null() {
            return None;
        }
        Some((v[0].as_u64().expect("size"), v[1].as_str().expect("sha").to_string(), v[2].clone()))
    }

    pub fn keys(&self, bucket: &str) -> Vec<String> {
        let out = self.py(&format!(
            "r = s3.list_objects_v2(Bucket='{bucket}')\nprint(json.dumps([o['Key'] for o in r.get('Contents', [])]))"
        ));
        serde_json::from_str(out.trim()).expect("json")
    }

    /// Multipart uploads begun and neither completed nor aborted.
    pub fn open_uploads(&self, bucket: &str) -> usize {
        let out = self.py(&format!("print(len(s3.list_multipart_uploads(Bucket='{bucket}').get('Uploads', [])))"));
        out.trim().parse().expect("count")
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// moto with `bucket` created, a scratch directory, a PKI and a credentials file.
fn setup(bucket: &str) -> (Moto, tempfile::TempDir, Pki, PathBuf) {
    let moto = Moto::start();
    moto.create_bucket(bucket);
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let creds = credentials(tmp.path());
    (moto, tmp, pki, creds)
}

/// A credentials file as `aws configure export-credentials` writes it, mode 0600.
fn credentials(dir: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("s3.env");
    fs::write(&path, "export AWS_ACCESS_KEY_ID=test\nexport AWS_SECRET_ACCESS_KEY=test\n").expect("write");
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).expect("chmod");
    path
}

/// A storage copying to `bucket` at `endpoint` (5 MiB parts, the smallest S3 takes).
fn with_bucket(spec: StorageSpec, endpoint: SocketAddr, bucket: &str, creds: &Path, more: &str) -> StorageSpec {
    let extra = format!(
        "    buckets:\n      - name: offsite\n        provider: s3\n        bucket: {bucket}\n        prefix: fleet/\n\
         \x20       region: us-east-1\n        endpoint: http://{endpoint}\n        credentials_file: {}\n\
         \x20       part_size: 5mib\n{more}",
        creds.display()
    );
    StorageSpec { extra, ..spec }
}

fn copies(archive: &Path) -> serde_json::Value {
    let mut p = archive.as_os_str().to_owned();
    p.push(".offsite.json");
    fs::read(PathBuf::from(p)).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or(serde_json::Value::Null)
}

/// Waits until the archive's copy to the `offsite` bucket is verified.
async fn copied(archive: &Path, within: Duration) -> serde_json::Value {
    let started = Instant::now();
    loop {
        let c = copies(archive);
        if c["buckets"]["offsite"]["state"] == "verified" {
            return c;
        }
        assert!(started.elapsed() < within, "not copied within {within:?}: {c}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn manifest(archive: &Path) -> serde_json::Value {
    let mut p = archive.as_os_str().to_owned();
    p.push(".json");
    serde_json::from_slice(&fs::read(PathBuf::from(p)).expect("manifest")).expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committed_archive_is_copied_in_parts_and_verified() {
    let (moto, tmp, pki, creds) = setup("fleet-backups");
    // Incompressible: the archive is ~13 MiB, three parts of 5 MiB.
    let src = noisy_source(tmp.path(), 13);
    let spec = with_bucket(zstd("main"), moto.addr, "fleet-backups", &creds, "");
    let server = TestServer::start(tmp.path(), &pki, &[spec]).await;
    let cfg = agent_config(&pki, server.addr, &[entry("data", "main", &[&src])]);
    let report = backup(&cfg, 0).await.expect("backup");
    let archive = server.archives("main", "web-01", "data").pop().expect("archive");
    let state = copied(&archive, Duration::from_secs(60)).await;
    let m = manifest(&archive);
    let key = format!("fleet/web-01/data/{}", report.archive);
    let (size, sha, meta) = moto.object("fleet-backups", &key).expect("the object is there");
    assert_eq!(size, m["size"].as_u64().expect("size"));
    assert_eq!(sha, m["sha256"].as_str().expect("sha"), "the object is the archive, byte for byte");
    assert_eq!(meta["nbackup-sha256"], m["sha256"]);
    assert_eq!(meta["nbackup-commit-seq"], m["commit_seq"].to_string());
    let e_tag = state["buckets"]["offsite"]["e_tag"].as_str().expect("e_tag");
    assert!(e_tag.trim_matches('"').ends_with("-3"), "three parts, composite tag checked: {e_tag}");
    let (_, _, _) = moto.object("fleet-backups", &format!("{key}.json")).expect("its manifest beside it");
    assert_eq!(moto.open_uploads("fleet-backups"), 0, "no multipart upload left open");
    let catalog = moto.object("fleet-backups", &format!("{key}.catalog")).expect("its catalog beside it");
    let local_catalog = fs::read(format!("{}.catalog", archive.display())).expect("the catalog on disk");
    assert_eq!(catalog.0, local_catalog.len() as u64);
    assert_eq!(
        moto.keys("fleet-backups"),
        [key.clone(), format!("{key}.catalog"), format!("{key}.json")],
        "nothing else in the bucket"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_keeps_an_archive_until_its_copy_is_verified() {
    let (moto, tmp, pki, creds) = setup("late");
    let src = dataset(&tmp.path().join("data"), "1M", 3);
    // The bucket's endpoint is a proxy that refuses everything until it is told.
    let proxy = Proxy::start(moto.addr).await;
    proxy.refuse_from(0);
    let spec = StorageSpec { max_backups: 1, ..with_bucket(gzip("main"), proxy.addr, "late", &creds, "") };
    let server = TestServer::start(tmp.path(), &pki, &[spec]).await;
    let cfg = agent_config(&pki, server.addr, &[entry("etc", "main", &[&src])]);
    let first = backup(&cfg, 0).await.expect("backup").archive;
    let second = backup(&cfg, 0).await.expect("backup").archive;
    let names = |s: &TestServer| -> Vec<String> {
        s.archives("main", "web-01", "etc")
            .iter()
            .map(|p| p.file_name().expect("n").to_string_lossy().into_owned())
            .collect()
    };
    assert_eq!(names(&server), [first.clone(), second.clone()], "max_backups 1, but the first is not copied yet");
    let archive = server.archives("main", "web-01", "etc")[0].clone();
    let failed = copies(&archive);
    assert_ne!(failed["buckets"]["offsite"]["state"], "verified", "{failed}");
    // The bucket is reachable again (the server restarted with the endpoint fixed):
    // both are copied, then rotation removes the first.
    server.stop().await;
    proxy.stop();
    let moto_direct = with_bucket(StorageSpec { max_backups: 1, ..gzip("main") }, moto.addr, "late", &creds, "");
    let server = TestServer::start(tmp.path(), &pki, &[moto_direct]).await;
    let last = server.archives("main", "web-01", "etc").pop().expect("archive");
    copied(&last, Duration::from_secs(60)).await;
    let started = Instant::now();
    while names(&server) != [second.clone()] {
        assert!(started.elapsed() < Duration::from_secs(60), "not rotated after the copies: {:?}", names(&server));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for name in [&first, &second] {
        assert!(moto.object("late", &format!("fleet/web-01/etc/{name}")).is_some(), "{name} is in the bucket");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upload_is_abandoned_and_resumed_from_the_last_part() {
    let (moto, tmp, pki, creds) = setup("slow");
    let src = noisy_source(tmp.path(), 18);
    // The connection carrying the first part freezes 1 MiB into it: no FIN, no RST.
    // moto closes every connection after its response, so the existence check is
    // connection 0, the multipart creation 1 and the first part 2; a server keeping
    // connections alive would carry them all on 0. Each freezes past 1 MiB.
    let proxy = Proxy::start(moto.addr).await;
    for conn in 0..3 {
        proxy.fault(conn, Fault::FreezeAfter(1 << 20));
    }
    let spec =
        with_bucket(zstd("main"), proxy.addr, "slow", &creds, "        stall_timeout: 2s\n        concurrency: 1\n");
    let server = TestServer::start(tmp.path(), &pki, &[spec]).await;
    let cfg = agent_config(&pki, server.addr, &[entry("data", "main", &[&src])]);
    let report = backup(&cfg, 0).await.expect("backup");
    let archive = server.archives("main", "web-01", "data").pop().expect("archive");
    let state = copied(&archive, Duration::from_secs(90)).await;
    assert!(state["buckets"]["offsite"]["attempts"].as_u64().expect("attempts") >= 1, "the stall was seen: {state}");
    assert!(proxy.accepted.load(std::sync::atomic::Ordering::SeqCst) >= 2, "and a new connection made");
    let m = manifest(&archive);
    let (size, sha, _) = moto.object("slow", &format!("fleet/web-01/data/{}", report.archive)).expect("object");
    assert_eq!((size, sha.as_str()), (m["size"].as_u64().expect("size"), m["sha256"].as_str().expect("sha")));
    assert_eq!(moto.open_uploads("slow"), 0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_mid_upload_resumes_the_same_multipart_upload() {
    let (moto, tmp, pki, creds) = setup("resume");
    let src = noisy_source(tmp.path(), 26);
    // 4 MiB/s: the 26 MiB upload takes ~6 s, long enough to be killed in the middle.
    let spec =
        with_bucket(zstd("main"), moto.addr, "resume", &creds, "        bandwidth: 4mb\n        concurrency: 1\n");
    let (config, addr) = ServerChild::configure(tmp.path(), &pki, &[spec], "");
    let mut server = ServerChild::start(&config, addr, "");
    let cfg = agent_config(&pki, addr, &[entry("data", "main", &[&src])]);
    let report = backup(&cfg, 0).await.expect("backup");
    let archive = tmp.path().join("storage/main/web-01/data").join(&report.archive);
    let started = Instant::now();
    let upload_id = loop {
        let c = copies(&archive);
        let parts = c["buckets"]["offsite"]["upload"]["parts"].as_array().map_or(0, Vec::len);
        if parts >= 2 {
            break c["buckets"]["offsite"]["upload"]["id"].as_str().expect("id").to_string();
        }
        assert!(started.elapsed() < Duration::from_secs(60), "no parts acknowledged: {c}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    server.kill9();
    assert_eq!(moto.open_uploads("resume"), 1, "the upload is open on the provider");
    let server = ServerChild::start(&config, addr, "");
    let state = copied(&archive, Duration::from_secs(60)).await;
    assert_eq!(state["buckets"]["offsite"]["attempts"], 0, "resumed, not failed: {state}");
    let m = manifest(&archive);
    let (size, sha, _) = moto.object("resume", &format!("fleet/web-01/data/{}", report.archive)).expect("object");
    assert_eq!((size, sha.as_str()), (m["size"].as_u64().expect("size"), m["sha256"].as_str().expect("sha")));
    assert_eq!(moto.open_uploads("resume"), 0, "upload {upload_id} was completed, not left open");
    server.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_sharing_a_bucket_and_prefix_keep_to_their_own_keys() {
    let (moto, tmp, pki, creds) = setup("shared");
    let src = dataset(&tmp.path().join("data"), "1M", 2);
    let spec = StorageSpec { max_backups: 1, ..with_bucket(gzip("main"), moto.addr, "shared", &creds, "") };
    let server = TestServer::start(tmp.path(), &pki, &[spec]).await;
    let mut names = Vec::new();
    for agent in ["web-01", "db-01"] {
        let yaml = agent_yaml(&pki, agent, &pki.agent(agent), server.addr, &[entry("etc", "main", &[&src])], "");
        let cfg = nbackup_protocol::config::AgentConfig::parse(&yaml, Path::new("agent.yaml")).expect("config");
        names.push((agent, backup(&cfg, 0).await.expect("backup").archive));
    }
    let mut want = Vec::new();
    for (agent, name) in &names {
        let archive = server.archives("main", agent, "etc").pop().expect("archive");
        copied(&archive, Duration::from_secs(60)).await;
        for suffix in ["", ".catalog", ".json"] {
            want.push(format!("fleet/{agent}/etc/{name}{suffix}"));
        }
    }
    // A second run of web-01 rotates its first archive locally (max_backups 1); the
    // bucket keeps every copy and db-01's objects are untouched.
    let yaml = agent_yaml(&pki, "web-01", &pki.agent("web-01"), server.addr, &[entry("etc", "main", &[&src])], "");
    let cfg = nbackup_protocol::config::AgentConfig::parse(&yaml, Path::new("agent.yaml")).expect("config");
    let again = backup(&cfg, 0).await.expect("backup").archive;
    let archive = server.archives("main", "web-01", "etc").pop().expect("archive");
    copied(&archive, Duration::from_secs(60)).await;
    for suffix in ["", ".catalog", ".json"] {
        want.push(format!("fleet/web-01/etc/{again}{suffix}"));
    }
    want.sort();
    assert_eq!(moto.keys("shared"), want);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retroactive_sync_uploads_only_what_the_bucket_lacks() {
    let (moto, tmp, pki, creds) = setup("later");
    let src = noisy_source(tmp.path(), 6);
    // Two archives committed while the storage had no bucket.
    let (config, addr) = ServerChild::configure(tmp.path(), &pki, &[gzip("main")], "");
    let server = ServerChild::start(&config, addr, "");
    let cfg = agent_config(&pki, addr, &[entry("data", "main", &[&src])]);
    let first = backup(&cfg, 0).await.expect("first backup").archive;
    let second = backup(&cfg, 0).await.expect("second backup").archive;
    let dir = tmp.path().join("storage/main/web-01/data");
    // The first is already in the bucket (copied by hand, one PUT, our metadata).
    let m = manifest(&dir.join(&first));
    let key = |a: &str| format!("fleet/web-01/data/{a}");
    moto.py(&format!(
        "s3.put_object(Bucket='later', Key='{}', Body=open('{}', 'rb').read(), Metadata={{'nbackup-sha256': '{}'}})",
        key(&first),
        dir.join(&first).display(),
        m["sha256"].as_str().expect("sha")
    ));
    let etag = |a: &str| moto.py(&format!("print(s3.head_object(Bucket='later', Key='{}')['ETag'])", key(a)));
    let hand_etag = etag(&first);

    // The bucket is configured afterwards: a reload starts its runner, which owes
    // nothing yet; `ctl sync` queues both.
    let spec = with_bucket(gzip("main"), moto.addr, "later", &creds, "");
    fs::write(&config, server_yaml(tmp.path(), &pki, addr, &[spec], "")).expect("config with a bucket");
    let socket = tmp.path().join("server.sock");
    let ctl = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_nbackup"))
            .args(["ctl", "--socket"])
            .arg(&socket)
            .args(args)
            .output()
            .expect("ctl runs");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "ctl {args:?}: {text}");
        text
    };
    ctl(&["reload"]);
    let said = ctl(&["sync", "main"]);
    assert!(said.contains("main/offsite: 2 archive(s) queued, 0 already owed"), "{said}");
    copied(&dir.join(&first), Duration::from_secs(60)).await;
    copied(&dir.join(&second), Duration::from_secs(60)).await;
    assert_eq!(etag(&first), hand_etag, "the copy already there was verified, not uploaded again");
    assert!(etag(&second).contains('-'), "the missing one was uploaded in parts");
    let m2 = manifest(&dir.join(&second));
    let (size, sha, _) = moto.object("later", &key(&second)).expect("object");
    assert_eq!((size, sha.as_str()), (m2["size"].as_u64().expect("size"), m2["sha256"].as_str().expect("sha")));
    let keys = moto.keys("later");
    assert!(
        keys.contains(&format!("{}.json", key(&first))) && keys.contains(&format!("{}.json", key(&second))),
        "{keys:?}"
    );
    let events = ctl(&["events", "--json"]);
    assert!(events.contains(&format!("{first} already in bucket offsite")), "{events}");
    // Nothing is left to do; naming what does not exist is an error.
    let again = ctl(&["sync"]);
    assert!(again.contains("main/offsite: 0 archive(s) queued, 0 already owed"), "{again}");
    let out = Command::new(env!("CARGO_BIN_EXE_nbackup"))
        .args(["ctl", "--socket"])
        .arg(&socket)
        .args(["sync", "--bucket", "nowhere"])
        .output()
        .expect("ctl runs");
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    // The disk loses the first: `ctl archives --buckets` shows it where it is now.
    for suffix in ["", ".json", ".catalog", ".offsite.json"] {
        let _ = fs::remove_file(format!("{}{suffix}", dir.join(&first).display()));
    }
    let listed = |more: &str| -> Vec<(String, Option<String>)> {
        let args: Vec<&str> = ["archives", "--json", more].into_iter().filter(|a| !a.is_empty()).collect();
        let v: Vec<serde_json::Value> = serde_json::from_str(&ctl(&args)).expect("json");
        v.iter()
            .map(|a| (a["name"].as_str().expect("name").to_string(), a["bucket"].as_str().map(str::to_string)))
            .collect()
    };
    assert_eq!(listed("--buckets"), [(first.clone(), Some("offsite".to_string())), (second.clone(), None)]);
    assert_eq!(listed(""), [(second.clone(), None)], "without --buckets, the disk alone");
    server.terminate();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_a_bucket_aborts_its_upload_in_progress_on_the_provider() {
    let (moto, tmp, pki, creds) = setup("gone");
    let src = noisy_source(tmp.path(), 26);
    let slow = "        bandwidth: 2mb\n        concurrency: 1\n";
    let (config, addr) =
        ServerChild::configure(tmp.path(), &pki, &[with_bucket(zstd("main"), moto.addr, "gone", &creds, slow)], "");
    let server = ServerChild::start(&config, addr, "");
    let cfg = agent_config(&pki, addr, &[entry("data", "main", &[&src])]);
    let report = backup(&cfg, 0).await.expect("backup");
    let archive = tmp.path().join("storage/main/web-01/data").join(&report.archive);
    let started = Instant::now();
    while copies(&archive)["buckets"]["offsite"]["upload"]["parts"].as_array().map_or(0, Vec::len) < 1 {
        assert!(started.elapsed() < Duration::from_secs(60), "no part acknowledged: {}", copies(&archive));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(moto.open_uploads("gone"), 1);
    // The bucket leaves the configuration: its open upload is aborted, not left to
    // accrue cost, and the archive's state forgets it.
    fs::write(&config, server_yaml(tmp.path(), &pki, addr, &[zstd("main")], "")).expect("config");
    let out = Command::new(env!("CARGO_BIN_EXE_nbackup"))
        .args(["ctl", "--socket"])
        .arg(tmp.path().join("server.sock"))
        .arg("reload")
        .output()
        .expect("ctl");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let started = Instant::now();
    while moto.open_uploads("gone") != 0 {
        assert!(started.elapsed() < Duration::from_secs(30), "the upload was left open on the provider");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let state = copies(&archive);
    assert!(state["buckets"]["offsite"]["upload"].is_null(), "{state}");
    assert_eq!(state["buckets"]["offsite"]["state"], "queued", "{state}");
    assert!(moto.object("gone", &format!("fleet/web-01/data/{}", report.archive)).is_none(), "never completed");
    server.terminate();
}

/// Azurite's blob service (npm `azurite`, installed by `.ci/run`) on a free port,
/// with the well-known development account.
struct Azurite {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

const AZURITE_KEY: &str = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

impl Azurite {
    fn start() -> Azurite {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
        let child = Command::new("azurite-blob")
            .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string(), "--silent", "--skipApiVersionCheck"])
            .arg("--location")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("these tests need azurite: npm install -g azurite (.ci/run installs it)");
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(started.elapsed() < Duration::from_secs(30), "azurite did not listen on {port}");
            std::thread::sleep(Duration::from_millis(50));
        }
        Azurite { child, port, _dir: dir }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/devstoreaccount1", self.port)
    }

    /// Runs `code` with `svc`, an azure-storage-blob client of this server.
    fn py(&self, code: &str) -> String {
        let script = format!(
            "import hashlib, json, sys\nfrom azure.storage.blob import BlobServiceClient\n\
             svc = BlobServiceClient.from_connection_string('DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;\
             AccountKey={AZURITE_KEY};BlobEndpoint={};')\n{code}\n",
            self.endpoint()
        );
        let out = Command::new("python3").args(["-c", &script]).output().expect("python3");
        assert!(out.status.success(), "azure-storage-blob: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).expect("utf-8")
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Azurite {
    /// A storage's `extra` for container `fleet` of this server, with a credentials
    /// file (mode 0600) in `dir`, 5 MiB blocks and `more` bucket keys.
    fn bucket(&self, dir: &Path, more: &str) -> String {
        use std::os::unix::fs::PermissionsExt;
        let creds = dir.join("azure.env");
        fs::write(
            &creds,
            format!("AZURE_STORAGE_ACCOUNT_NAME=devstoreaccount1\nAZURE_STORAGE_ACCOUNT_KEY={AZURITE_KEY}\n"),
        )
        .expect("credentials");
        fs::set_permissions(&creds, fs::Permissions::from_mode(0o600)).expect("chmod");
        format!(
            "    buckets:\n      - name: offsite\n        provider: azure\n        bucket: fleet\n        prefix: nb/\n\
             \x20       endpoint: {}\n        credentials_file: {}\n        part_size: 5mib\n{more}",
            self.endpoint(),
            creds.display()
        )
    }

    /// Azurite with container `fleet`, a scratch directory and a PKI.
    fn setup() -> (Azurite, tempfile::TempDir, Pki) {
        let azurite = Azurite::start();
        azurite.py("svc.create_container('fleet')");
        let tmp = tempfile::tempdir().expect("tempdir");
        let pki = Pki::new(&tmp.path().join("pki"));
        (azurite, tmp, pki)
    }

    /// The ids of `key`'s blocks: (committed, uncommitted).
    fn blocks(&self, key: &str) -> (Vec<String>, Vec<String>) {
        let out = self.py(&format!(
            "c, u = svc.get_blob_client('fleet', '{key}').get_block_list('all')\n\
             print(json.dumps([[b.id for b in c], [b.id for b in u]]))"
        ));
        serde_json::from_str(out.trim()).expect("json")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_archive_is_copied_to_azure_blob_storage_in_blocks_and_verified() {
    let (azurite, tmp, pki) = Azurite::setup();
    let extra = azurite.bucket(tmp.path(), "");
    let server = TestServer::start(tmp.path(), &pki, &[StorageSpec { extra, ..zstd("main") }]).await;
    let src = noisy_source(tmp.path(), 12);
    let cfg = agent_config(&pki, server.addr, &[entry("data", "main", &[&src])]);
    let report = backup(&cfg, 0).await.expect("backup");
    let archive = server.archives("main", "web-01", "data").pop().expect("archive");
    let state = copied(&archive, Duration::from_secs(60)).await;
    let parts = state["buckets"]["offsite"]["upload"].clone();
    assert!(parts.is_null(), "the upload is finished: {state}");
    let m = manifest(&archive);
    let key = format!("nb/web-01/data/{}", report.archive);
    let out = azurite.py(&format!(
        "b = svc.get_blob_client('fleet', '{key}')\nbody = b.download_blob().readall()\np = b.get_blob_properties()\n\
         print(json.dumps([len(body), hashlib.sha256(body).hexdigest(), p.metadata, p.blob_type.value]))"
    ));
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    assert_eq!(v[0].as_u64(), m["size"].as_u64(), "{v}");
    assert_eq!(v[1].as_str(), m["sha256"].as_str(), "the blob is the archive, byte for byte");
    assert_eq!(v[3], "BlockBlob");
    // A block blob's list cannot carry our metadata through object_store: the
    // SHA-256 travels in the manifest beside it.
    let sidecar =
        azurite.py(&format!("print(svc.get_blob_client('fleet', '{key}.json').download_blob().readall().decode())"));
    let beside: serde_json::Value = serde_json::from_str(sidecar.trim()).expect("manifest json");
    assert_eq!(beside["sha256"], m["sha256"], "the manifest beside it");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_mid_upload_to_azure_commits_the_blocks_it_had_sent() {
    let (azurite, tmp, pki) = Azurite::setup();
    // 4 MiB/s: the 26 MiB upload takes ~6 s, long enough to be killed in the middle.
    let extra = azurite.bucket(tmp.path(), "        bandwidth: 4mb\n        concurrency: 1\n");
    let (config, addr) = ServerChild::configure(tmp.path(), &pki, &[StorageSpec { extra, ..zstd("main") }], "");
    let mut server = ServerChild::start(&config, addr, "");
    let src = noisy_source(tmp.path(), 26);
    let cfg = agent_config(&pki, addr, &[entry("data", "main", &[&src])]);
    let report = backup(&cfg, 0).await.expect("backup");
    let archive = tmp.path().join("storage/main/web-01/data").join(&report.archive);
    let key = format!("nb/web-01/data/{}", report.archive);
    let started = Instant::now();
    // The block ids the server has recorded as acknowledged.
    let recorded = || -> Vec<String> {
        serde_json::from_value(copies(&archive)["buckets"]["offsite"]["upload"]["parts"].clone()).unwrap_or_default()
    };
    let sent = loop {
        let parts = recorded();
        if parts.len() >= 2 {
            break parts;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "no blocks acknowledged: {}", copies(&archive));
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    server.kill9();
    let (committed, staged) = azurite.blocks(&key);
    assert!(committed.is_empty(), "nothing committed before the kill: {committed:?}");
    let acknowledged = recorded();
    assert!(acknowledged.len() >= sent.len() && acknowledged.iter().all(|id| staged.contains(id)), "{staged:?}");
    let server = ServerChild::start(&config, addr, "");
    let state = copied(&archive, Duration::from_secs(60)).await;
    assert_eq!(state["buckets"]["offsite"]["attempts"], 0, "resumed, not failed: {state}");
    let (committed, _) = azurite.blocks(&key);
    assert_eq!(committed.len(), 6, "26 MiB in 5 MiB blocks: {committed:?}");
    assert_eq!(
        &committed[..acknowledged.len()],
        &acknowledged[..],
        "the blob begins with the blocks sent before the kill, not a second copy of them"
    );
    let m = manifest(&archive);
    let out = azurite.py(&format!(
        "body = svc.get_blob_client('fleet', '{key}').download_blob().readall()\n\
         print(json.dumps([len(body), hashlib.sha256(body).hexdigest()]))"
    ));
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    assert_eq!((v[0].as_u64(), v[1].as_str()), (m["size"].as_u64(), m["sha256"].as_str()), "byte for byte");
    server.terminate();
}

/// Waits until `cond` holds, showing `what` if it does not within a minute.
async fn until(what: &str, cond: impl FnMut() -> bool) {
    until_shown(what, cond, String::new).await
}

/// [`until`], showing `state()` too if it fails.
async fn until_shown(what: &str, mut cond: impl FnMut() -> bool, state: impl Fn() -> String) {
    let started = Instant::now();
    while !cond() {
        assert!(started.elapsed() < Duration::from_secs(60), "not within a minute: {what} {}", state());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The files of `dir`, with the off-site state of each archive, for a failure's message.
fn shown_dir(dir: &Path) -> String {
    let mut files: Vec<PathBuf> =
        fs::read_dir(dir).map(|rd| rd.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    files.sort();
    let shown = files.iter().map(|p| {
        if p.to_string_lossy().ends_with(".offsite.json") {
            format!("{}: {}", p.display(), fs::read_to_string(p).unwrap_or_default())
        } else {
            p.display().to_string()
        }
    });
    shown.collect::<Vec<_>>().join("\n")
}

fn file_names(paths: &[PathBuf]) -> Vec<String> {
    paths.iter().map(|p| p.file_name().expect("name").to_string_lossy().into_owned()).collect()
}

/// Archive keys (not their `.json` or `.catalog`) under `prefix`.
fn archive_keys(moto: &Moto, bucket: &str, prefix: &str) -> Vec<String> {
    let mut keys: Vec<String> = moto
        .keys(bucket)
        .into_iter()
        .filter(|k| k.starts_with(prefix) && (k.ends_with(".tar.gz") || k.ends_with(".tar.zst")))
        .collect();
    keys.sort_by_key(|k| commit_order(k));
    keys
}

fn nbackup(args: &[&str], config: &Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_nbackup"))
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .expect("nbackup runs")
}

// The binary runs synchronously: the in-process server needs other threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offload_bucket_keeps_the_disk_small_and_restores_what_it_holds() {
    let (moto, tmp, pki, creds) = setup("offload");
    let src = dataset(&tmp.path().join("data"), "1M", 4);
    let spec = StorageSpec {
        max_backups: 3,
        ..with_bucket(zstd("main"), moto.addr, "offload", &creds, "        mode: offload\n        keep_local: 1\n")
    };
    let server = TestServer::start(tmp.path(), &pki, &[spec]).await;
    let yaml = agent_yaml(&pki, "web-01", &pki.agent("web-01"), server.addr, &[entry("etc", "main", &[&src])], "");
    let config = tmp.path().join("agent.yaml");
    fs::write(&config, &yaml).expect("config");
    let cfg = nbackup_protocol::config::AgentConfig::parse(&yaml, &config).expect("config");
    let mut names = Vec::new();
    for _ in 0..3 {
        names.push(backup(&cfg, 0).await.expect("backup").archive);
    }
    // Each left the disk once verified in the bucket, except the newest (keep_local 1).
    until("only the newest on disk, all three in the bucket", || {
        file_names(&server.archives("main", "web-01", "etc")) == [names[2].clone()]
            && archive_keys(&moto, "offload", "fleet/web-01/etc/").len() == 3
    })
    .await;
    copied(&server.archives("main", "web-01", "etc")[0], Duration::from_secs(60)).await;

    // The agent lists all three: two in the bucket, one on disk.
    let out = nbackup(&["list", "--json"], &config);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let listed: Vec<(String, Option<String>)> = list
        .as_array()
        .expect("array")
        .iter()
        .map(|a| (a["archive"].as_str().expect("name").to_string(), a["bucket"].as_str().map(str::to_string)))
        .collect();
    assert_eq!(
        listed,
        [
            (names[0].clone(), Some("offsite".to_string())),
            (names[1].clone(), Some("offsite".into())),
            (names[2].clone(), None)
        ],
        "commit order, with where each one is"
    );
    assert!(list[0]["catalog"].as_u64().is_some_and(|n| n > 0) && list[0]["sha256"].is_string(), "{list}");

    // The oldest comes back from the bucket through the same RSTR path, verified,
    // its catalog too; and the server can verify it in the bucket.
    let dest = tmp.path().join("restored");
    let out =
        nbackup(&["restore", "--json", "--entry", "etc", "--at", &names[0], "--to", &dest.to_string_lossy()], &config);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(result["verified"], true, "{result}");
    assert_restored(std::slice::from_ref(&src), &nbackup_protocol::config::Excludes::none(), &dest);
    let out = nbackup(&["ls", "--json", "--entry", "etc", "--at", &names[1]], &config);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let members: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("json");
    assert!(members.len() > 10, "the catalog read from the bucket: {} members", members.len());
    let out = nbackup(&["verify", "--entry", "etc", "--at", &names[0]], &config);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("verified in bucket offsite"), "{:?}", out);

    // A fourth run: the bucket keeps max_backups (3) — the first archive, its
    // manifest and catalog are deleted from it.
    names.push(backup(&cfg, 0).await.expect("backup").archive);
    until("the bucket's retention deleted the oldest", || {
        archive_keys(&moto, "offload", "fleet/web-01/etc/")
            == names[1..].iter().map(|n| format!("fleet/web-01/etc/{n}")).collect::<Vec<_>>()
    })
    .await;
    until("its sidecars went with it", || !moto.keys("offload").iter().any(|k| k.contains(&names[0]))).await;
    assert_eq!(file_names(&server.archives("main", "web-01", "etc")).last(), names.last());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_archive_bucket_keeps_its_own_retention_per_agent_and_entry() {
    let (moto, tmp, pki, creds) = setup("long-term");
    let src = dataset(&tmp.path().join("data"), "1M", 5);
    // The disk keeps one of each entry, the bucket the newest two.
    let spec = StorageSpec {
        max_backups: 1,
        ..with_bucket(gzip("main"), moto.addr, "long-term", &creds, "        mode: archive\n        retain: 2\n")
    };
    let server = TestServer::start(tmp.path(), &pki, &[spec]).await;
    let config = |agent: &str| {
        let entries = [entry("etc", "main", &[&src]), entry("www", "main", &[&src])];
        let yaml = agent_yaml(&pki, agent, &pki.agent(agent), server.addr, &entries, "");
        nbackup_protocol::config::AgentConfig::parse(&yaml, Path::new("agent.yaml")).expect("config")
    };
    let (web, db) = (config("web-01"), config("db-01"));
    let mut etc = Vec::new();
    for _ in 0..3 {
        etc.push(backup(&web, 0).await.expect("backup").archive);
    }
    let www = backup(&web, 1).await.expect("backup").archive;
    let db_etc = backup(&db, 0).await.expect("backup").archive;
    let disk = server.storage_dir("main").join("web-01").join("etc");
    let keys = || format!("{:?}\nexpected {etc:?}\nthe disk: {}", moto.keys("long-term"), shown_dir(&disk));
    until_shown(
        "web-01/etc: the newest two in the bucket",
        || {
            archive_keys(&moto, "long-term", "fleet/web-01/etc/")
                == etc[1..].iter().map(|n| format!("fleet/web-01/etc/{n}")).collect::<Vec<_>>()
        },
        keys,
    )
    .await;
    until("the others copied", || {
        archive_keys(&moto, "long-term", "fleet/web-01/www/") == [format!("fleet/web-01/www/{www}")]
            && archive_keys(&moto, "long-term", "fleet/db-01/etc/") == [format!("fleet/db-01/etc/{db_etc}")]
    })
    .await;
    until("the disk kept one of each entry", || {
        file_names(&server.archives("main", "web-01", "etc")) == [etc[2].clone()]
    })
    .await;
    // A hand-made object beside them with a name that is not an archive of the
    // entry is never touched, and db-01's run did not prune web-01 or the reverse.
    moto.py("s3.put_object(Bucket='long-term', Key='fleet/web-01/etc/notes.txt', Body=b'mine')");
    etc.push(backup(&web, 0).await.expect("backup").archive);
    until("web-01/etc pruned again", || {
        archive_keys(&moto, "long-term", "fleet/web-01/etc/")
            == etc[2..].iter().map(|n| format!("fleet/web-01/etc/{n}")).collect::<Vec<_>>()
    })
    .await;
    assert!(moto.object("long-term", "fleet/web-01/etc/notes.txt").is_some(), "a foreign object is kept");
    assert_eq!(archive_keys(&moto, "long-term", "fleet/db-01/"), [format!("fleet/db-01/etc/{db_etc}")]);
    server.stop().await;
}

// The binary runs synchronously: the in-process server needs other threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_archive_lost_from_disk_is_restored_from_its_bucket() {
    let (moto, tmp, pki, creds) = setup("rescue");
    let src = dataset(&tmp.path().join("data"), "1M", 6);
    let server =
        TestServer::start(tmp.path(), &pki, &[with_bucket(gzip("main"), moto.addr, "rescue", &creds, "")]).await;
    let yaml = agent_yaml(&pki, "web-01", &pki.agent("web-01"), server.addr, &[entry("etc", "main", &[&src])], "");
    let config = tmp.path().join("agent.yaml");
    fs::write(&config, &yaml).expect("config");
    let cfg = nbackup_protocol::config::AgentConfig::parse(&yaml, &config).expect("config");
    let name = backup(&cfg, 0).await.expect("backup").archive;
    let archive = server.archives("main", "web-01", "etc").pop().expect("archive");
    copied(&archive, Duration::from_secs(60)).await;
    // The disk loses the archive and everything beside it — the archive last: the
    // rotation that follows a copy may still be running, and it sweeps the sidecars
    // of an archive that is gone.
    let dir = archive.parent().expect("entry dir");
    for suffix in [".offsite.json", ".catalog", ".json", ""] {
        let path = format!("{}{suffix}", archive.display());
        fs::remove_file(&path).unwrap_or_else(|e| panic!("remove {path}: {e}\nthe disk: {}", shown_dir(dir)));
    }
    let dest = tmp.path().join("restored");
    let out = nbackup(&["restore", "--json", "--entry", "etc", "--to", &dest.to_string_lossy()], &config);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!((result["verified"].clone(), result["archive"].clone()), (true.into(), name.clone().into()), "{result}");
    assert_restored(std::slice::from_ref(&src), &nbackup_protocol::config::Excludes::none(), &dest);
    // A damaged copy in the bucket fails verification there (exit 7), named as such.
    moto.py(&format!(
        "k = 'fleet/web-01/etc/{name}'\nb = bytearray(s3.get_object(Bucket='rescue', Key=k)['Body'].read())\n\
         b[len(b) // 2] ^= 0xff\ns3.put_object(Bucket='rescue', Key=k, Body=bytes(b))"
    ));
    let out = nbackup(&["verify", "--entry", "etc"], &config);
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(said.contains("corrupt in bucket offsite"), "{said}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_bucket_holds_every_object_and_retention_waits_for_the_lock() {
    let moto = Moto::start();
    moto.py("s3.create_bucket(Bucket='vault', ObjectLockEnabledForBucket=True)");
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(&tmp.path().join("pki"));
    let creds = credentials(tmp.path());
    let src = noisy_source(tmp.path(), 11);
    let more = "        mode: archive\n        retain: 1\n        immutable_days: 2\n";
    let spec = StorageSpec { max_backups: 1, ..with_bucket(zstd("main"), moto.addr, "vault", &creds, more) };
    let server = TestServer::start(tmp.path(), &pki, &[spec]).await;
    let cfg = agent_config(&pki, server.addr, &[entry("data", "main", &[&src])]);
    let first = backup(&cfg, 0).await.expect("backup").archive;
    let archive = server.archives("main", "web-01", "data").pop().expect("archive");
    let state = copied(&archive, Duration::from_secs(60)).await;
    let until = state["buckets"]["offsite"]["locked_until"].as_u64().expect("locked_until recorded");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("time").as_secs();
    assert!((now + 2 * 86_400 - 120..=now + 2 * 86_400).contains(&until), "two days from now: {until} vs {now}");
    let e_tag = state["buckets"]["offsite"]["e_tag"].as_str().expect("e_tag");
    assert!(e_tag.trim_matches('"').ends_with("-3"), "three parts with checksums, composite tag checked: {e_tag}");
    for suffix in ["", ".json", ".catalog"] {
        let key = format!("fleet/web-01/data/{first}{suffix}");
        let out = moto.py(&format!(
            "r = s3.head_object(Bucket='vault', Key='{key}')\n\
             print(r['ObjectLockMode'], r['ObjectLockRetainUntilDate'].isoformat())"
        ));
        assert!(out.starts_with("COMPLIANCE 20"), "{key}: {out}");
    }
    // retain 1: the second archive would push the first out, but it is locked for
    // two days, so both stay.
    let second = backup(&cfg, 0).await.expect("backup").archive;
    let archive = server.archives("main", "web-01", "data").pop().expect("archive");
    copied(&archive, Duration::from_secs(60)).await;
    assert_eq!(
        archive_keys(&moto, "vault", "fleet/"),
        [format!("fleet/web-01/data/{first}"), format!("fleet/web-01/data/{second}")],
        "the locked one is kept past retain 1"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_that_falls_behind_is_raised_and_its_recovery_too() {
    let (moto, tmp, pki, creds) = setup("behind");
    let src = dataset(&tmp.path().join("data"), "1M", 7);
    let proxy = Proxy::start(moto.addr).await;
    proxy.refuse_from(0);
    let spec = with_bucket(gzip("main"), proxy.addr, "behind", &creds, "        alert_after: 1s\n");
    let server = TestServer::start_logged(tmp.path(), &pki, &[spec]).await;
    let cfg = agent_config(&pki, server.addr, &[entry("etc", "main", &[&src])]);
    backup(&cfg, 0).await.expect("backup");
    let events = || fs::read_to_string(tmp.path().join("state/server-events.jsonl")).unwrap_or_default();
    until("offsite_lagging", || events().contains("\"offsite_lagging\"")).await;
    let raised = events();
    let line = raised.lines().find(|l| l.contains("offsite_lagging")).expect("the event");
    assert!(line.contains("main/offsite: 1 archive(s) not yet copied"), "{line}");
    assert!(!raised.contains("offsite_caught_up"), "not before it is");
    proxy.accept_again();
    let archive = server.archives("main", "web-01", "etc").pop().expect("archive");
    copied(&archive, Duration::from_secs(60)).await;
    until("offsite_caught_up", || events().contains("\"offsite_caught_up\"")).await;
    assert_eq!(events().matches("\"offsite_lagging\"").count(), 1, "raised once, however long it lasted");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archives_a_bucket_would_prune_at_once_are_not_uploaded() {
    let (moto, tmp, pki, creds) = setup("catch-up");
    let src = dataset(&tmp.path().join("data"), "1M", 8);
    // The bucket is unreachable while three archives are committed; it keeps one.
    let proxy = Proxy::start(moto.addr).await;
    proxy.refuse_from(0);
    let more = "        mode: archive\n        retain: 1\n";
    let spec = StorageSpec { max_backups: 3, ..with_bucket(gzip("main"), proxy.addr, "catch-up", &creds, more) };
    let server = TestServer::start(tmp.path(), &pki, &[spec]).await;
    let cfg = agent_config(&pki, server.addr, &[entry("etc", "main", &[&src])]);
    let mut names = Vec::new();
    for _ in 0..3 {
        names.push(backup(&cfg, 0).await.expect("backup").archive);
    }
    proxy.accept_again();
    let archives = server.archives("main", "web-01", "etc");
    assert_eq!(file_names(&archives), names);
    copied(&archives[2], Duration::from_secs(60)).await;
    // Catching up, the two older ones were not sent only to be deleted.
    for older in &archives[..2] {
        until_shown(
            "the older archives settled as not kept",
            || copies(older)["buckets"]["offsite"]["state"] == "not_kept",
            || copies(older).to_string(),
        )
        .await;
    }
    assert_eq!(archive_keys(&moto, "catch-up", "fleet/"), [format!("fleet/web-01/etc/{}", names[2])]);
    server.stop().await;
}

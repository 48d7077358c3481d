use super::*;
use proptest::prelude::*;

fn name(s: &str) -> Name {
    Name::new(s).expect("valid test name")
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn decode_all(bytes: &[u8]) -> Result<Option<Frame>, DecodeError> {
    let mut buf = BytesMut::from(bytes);
    let frame = decode_frame(&mut buf)?;
    if frame.is_some() {
        assert!(buf.is_empty(), "decoder left {} bytes", buf.len());
    }
    Ok(frame)
}

// Golden vectors: these bytes are the protocol. If one of these tests fails, either
// the change is a bug or PROTOCOL_VERSION must change and docs/protocol.md with it.

#[test]
fn golden_preamble() {
    let p = Preamble::new(ConnKind::Backup, Caps::GZIP.union(Caps::ZSTD));
    assert_eq!(hex(&p.encode()), "4e424b500003".to_owned() + "00000003");
    assert_eq!(Preamble::decode(&p.encode()), Ok(p));
    let join = Preamble::new(ConnKind::Join, Caps::GZIP);
    assert_eq!(&join.encode()[..4], b"JOIN");
    let ping = Preamble::new(ConnKind::Ping, Caps::default());
    assert_eq!(hex(&ping.encode()), "50494e47000300000000");
}

#[test]
fn golden_keepalive_and_committing() {
    assert_eq!(hex(&Frame::Keepalive.to_bytes().expect("encodes")), "1200000000");
    let f = Frame::Committing(CommitProgress { verified: 0x10_0000, total: 0x40_0000 });
    assert_eq!(hex(&f.to_bytes().expect("encodes")), "2400000010".to_owned() + "0000000000100000" + "0000000000400000");
}

#[test]
fn rejects_encoding_an_oversized_document_instead_of_cutting_it() {
    let json = "x".repeat(MAX_JSON_LEN + 1);
    let err = Frame::CtlReport(CtlMessage { id: 1, json }).to_bytes().expect_err("too long");
    assert_eq!(
        err,
        EncodeError::TooLong { frame: "CtlReport", field: "json", len: MAX_JSON_LEN + 1, max: MAX_JSON_LEN }
    );
    let err = Frame::CtlResult(CtlResult { id: 1, ok: true, message: "é".repeat(MAX_TEXT_LEN) })
        .to_bytes()
        .expect_err("too long");
    assert!(matches!(err, EncodeError::TooLong { field: "message", .. }), "{err:?}");
    let mut buf = BytesMut::from(&b"kept"[..]);
    assert!(Frame::CtlReport(CtlMessage { id: 1, json: "y".repeat(MAX_JSON_LEN + 1) }).encode(&mut buf).is_err());
    assert_eq!(&buf[..], b"kept", "a failed encode leaves the buffer as it was");
}

#[test]
fn golden_hello() {
    let f = Frame::Hello(Hello {
        agent: name("web-01"),
        storage: name("main"),
        backup: name("etc"),
        agent_version: "0.1.0".into(),
        chunk_size: 1 << 20,
        streams: 4,
    });
    assert_eq!(
        hex(&f.to_bytes().expect("encodes")),
        "010000001d\
         06\
         7765622d3031\
         04\
         6d61696e\
         03\
         657463\
         0005\
         302e312e30\
         00100000\
         0004"
    );
}

#[test]
fn golden_welcome() {
    let f = Frame::Welcome(Welcome {
        session: SessionId([0x11; 16]),
        compression: Compression::Zstd,
        level: 3,
        max_streams: 8,
    });
    assert_eq!(
        hex(&f.to_bytes().expect("encodes")),
        "0200000017\
         11111111111111111111111111111111\
         02\
         00000003\
         0008"
    );
}

#[test]
fn golden_chunk_and_ack() {
    let chunk = Chunk::new(2, 2 << 20, Bytes::from_static(b"abc"));
    // CRC32C("abc") = 0x364b3fb7 (RFC 3720 test vectors use the same polynomial).
    assert_eq!(chunk.crc32c, 0x364b_3fb7);
    assert_eq!(
        hex(&Frame::Chunk(chunk).to_bytes().expect("encodes")),
        "1000000017\
         0000000000000002\
         0000000000200000\
         364b3fb7\
         616263"
    );
    assert_eq!(hex(&Frame::Ack(Ack { seq: 7 }).to_bytes().expect("encodes")), "11000000080000000000000007");
}

#[test]
fn golden_commit_and_committed() {
    let commit = Frame::Commit(Commit {
        total_len: 5,
        chunks: 1,
        sha256: [0xaa; 32],
        stats: SourceStats { entries: 3, bytes_read: 9, skipped: 1 },
        catalog: None,
    });
    assert_eq!(
        hex(&commit.to_bytes().expect("encodes")),
        format!(
            "2000000049{}{}{}{}{}{}00",
            "0000000000000005",
            "0000000000000001",
            "aa".repeat(32),
            "0000000000000003",
            "0000000000000009",
            "0000000000000001"
        )
    );
    let with_catalog = Frame::Commit(Commit {
        total_len: 5,
        chunks: 1,
        sha256: [0xaa; 32],
        stats: SourceStats::default(),
        catalog: Some(CatalogDigest { len: 2, sha256: [0xcc; 32] }),
    });
    let bytes = hex(&with_catalog.to_bytes().expect("encodes"));
    assert!(bytes.starts_with("2000000071"), "{bytes}");
    assert!(bytes.ends_with(&format!("01{}{}", "0000000000000002", "cc".repeat(32))), "{bytes}");
    let part = Frame::CatalogPart(CatalogPart { offset: 3, data: Bytes::from_static(b"ab") });
    assert_eq!(hex(&part.to_bytes().expect("encodes")), "250000000a00000000000000036162");
    let committed = Frame::Committed(Committed { archive: "a.tar.gz".into(), size: 5, sha256: [0xbb; 32] });
    assert_eq!(
        hex(&committed.to_bytes().expect("encodes")),
        format!("2100000032000861{}{}{}", hex(b".tar.gz"), "0000000000000005", "bb".repeat(32))
    );
}

#[test]
fn golden_refused_and_abort() {
    let f = Frame::Refused(Refusal::new(Reason::Busy, "x"));
    assert_eq!(hex(&f.to_bytes().expect("encodes")), "0300000005000300".to_owned() + "0178");
    let f = Frame::Abort(Refusal::new(Reason::DiskFull, ""));
    assert_eq!(hex(&f.to_bytes().expect("encodes")), "300000000400040000");
}

#[test]
fn golden_join_joined_health() {
    let f = Frame::Join(Join { session: SessionId([0x22; 16]), stream: 3, generation: 2 });
    assert_eq!(hex(&f.to_bytes().expect("encodes")), format!("0400000016{}000300000002", "22".repeat(16)));
    assert_eq!(
        hex(&Frame::Joined(Joined { stream: 3, contiguous: 5 }).to_bytes().expect("encodes")),
        "050000000a00030000000000000005"
    );
    let f = Frame::Health(Health {
        server_version: "1".into(),
        uptime_secs: 2,
        draining: false,
        active_sessions: 1,
        storages: vec![StorageHealth {
            name: name("m"),
            compression: Compression::Gzip,
            free_bytes: 10,
            total_bytes: 20,
        }],
    });
    assert_eq!(
        hex(&f.to_bytes().expect("encodes")),
        "4000000025\
         000131\
         0000000000000002\
         00\
         00000001\
         0001\
         016d\
         01\
         000000000000000a\
         0000000000000014"
    );
}

#[test]
fn golden_status_and_session_state() {
    let f = Frame::Status(Status { session: SessionId([0x33; 16]) });
    assert_eq!(hex(&f.to_bytes().expect("encodes")), format!("2200000010{}", "33".repeat(16)));
    assert_eq!(hex(&Frame::SessionState(SessionState::Unknown).to_bytes().expect("encodes")), "230000000100");
    assert_eq!(
        hex(&Frame::SessionState(SessionState::Open { contiguous: 9 }).to_bytes().expect("encodes")),
        "23000000090100000000000000".to_owned() + "09"
    );
    let done = Committed { archive: "a".into(), size: 1, sha256: [0xcc; 32] };
    assert_eq!(
        hex(&Frame::SessionState(SessionState::Committed(done)).to_bytes().expect("encodes")),
        format!("230000002c0200016100000000000000 01{}", "cc".repeat(32)).replace(' ', "")
    );
    let failed = SessionState::Failed(Refusal::new(Reason::Expired, "x"));
    assert_eq!(hex(&Frame::SessionState(failed).to_bytes().expect("encodes")), "230000000603000d000178");
}

#[test]
fn golden_control_channel() {
    assert_eq!(&Preamble::new(ConnKind::Control, Caps::default()).encode()[..4], b"CTRL");
    assert_eq!(hex(&Frame::CtlPing(CtlPing { nonce: 1 }).to_bytes().expect("encodes")), "50000000080000000000000001");
    assert_eq!(
        hex(&Frame::CtlPong(CtlPong { nonce: 1, load_milli: 1500, free_bytes: 2 }).to_bytes().expect("encodes")),
        "51000000140000000000000001000005dc0000000000000002"
    );
    assert_eq!(
        hex(&Frame::CtlReport(CtlMessage { id: 0, json: "{}".into() }).to_bytes().expect("encodes")),
        "520000000e0000000000000000000000027b7d"
    );
    assert_eq!(
        hex(&Frame::CtlCommand(CtlMessage { id: 7, json: "{}".into() }).to_bytes().expect("encodes")),
        "530000000e0000000000000007000000027b7d"
    );
    assert_eq!(
        hex(&Frame::CtlResult(CtlResult { id: 7, ok: true, message: "ok".into() }).to_bytes().expect("encodes")),
        "540000000d0000000000000007010002".to_owned() + "6f6b"
    );
}

#[test]
fn golden_restore() {
    assert_eq!(&Preamble::new(ConnKind::Restore, Caps::default()).encode()[..4], b"RSTR");
    assert_eq!(hex(&Frame::RestoreRequest("{}".into()).to_bytes().expect("encodes")), "6000000006000000027b7d");
    assert_eq!(hex(&Frame::RestoreReply("{}".into()).to_bytes().expect("encodes")), "6100000006000000027b7d");
    assert_eq!(Reason::from_code(0x0013), Reason::NotFound);
}

#[test]
fn golden_enroll() {
    assert_eq!(&Preamble::new(ConnKind::Enroll, Caps::default()).encode()[..4], b"ENRL");
    assert_eq!(ConnKind::from_magic(*b"ENRL"), Some(ConnKind::Enroll));
    assert_eq!(hex(&Frame::EnrollRequest("{}".into()).to_bytes().expect("encodes")), "7000000006000000027b7d");
    assert_eq!(hex(&Frame::EnrollReply("{}".into()).to_bytes().expect("encodes")), "7100000006000000027b7d");
}

#[test]
fn rejects_oversized_json() {
    let mut bytes = vec![0x52, 0, 0, 0, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff];
    bytes.truncate(17);
    assert!(matches!(decode_all(&bytes), Err(DecodeError::TooLong { field: "json", .. })));
}

#[test]
fn rejects_unknown_session_states() {
    assert_eq!(decode_all(&[0x23, 0, 0, 0, 1, 7]), Err(DecodeError::UnknownValue { field: "session state", value: 7 }));
}

#[test]
fn accepts_frames_split_at_every_byte() {
    let frame = Frame::Hello(Hello {
        agent: name("a"),
        storage: name("b"),
        backup: name("c"),
        agent_version: "v".into(),
        chunk_size: 65536,
        streams: 1,
    });
    let bytes = frame.to_bytes().expect("encodes");
    for cut in 0..bytes.len() {
        let mut buf = BytesMut::from(&bytes[..cut]);
        assert_eq!(decode_frame(&mut buf), Ok(None), "cut at {cut}");
        assert_eq!(buf.len(), cut, "nothing consumed while incomplete");
        buf.extend_from_slice(&bytes[cut..]);
        assert_eq!(decode_frame(&mut buf), Ok(Some(frame.clone())));
    }
}

#[test]
fn accepts_back_to_back_frames() {
    let mut buf = Frame::Ack(Ack { seq: 1 }).to_bytes().expect("encodes");
    Frame::Ack(Ack { seq: 2 }).encode(&mut buf).expect("encodes");
    assert_eq!(decode_frame(&mut buf), Ok(Some(Frame::Ack(Ack { seq: 1 }))));
    assert_eq!(decode_frame(&mut buf), Ok(Some(Frame::Ack(Ack { seq: 2 }))));
    assert_eq!(decode_frame(&mut buf), Ok(None));
}

#[test]
fn rejects_unknown_frame_type_from_header_alone() {
    assert_eq!(decode_all(&[0x7f, 0, 0, 0, 0]), Err(DecodeError::UnknownFrameType(0x7f)));
}

#[test]
fn rejects_oversized_lengths_before_buffering() {
    // Only the header is present: the decoder must refuse without waiting for 4 GiB.
    assert_eq!(
        decode_all(&[0x10, 0xff, 0xff, 0xff, 0xff]),
        Err(DecodeError::FrameTooLarge { frame: "Chunk", len: u32::MAX, max: MAX_CHUNK_PAYLOAD })
    );
    assert_eq!(
        decode_all(&[0x01, 0x00, 0x01, 0x00, 0x01]),
        Err(DecodeError::FrameTooLarge { frame: "Hello", len: 65537, max: MAX_CONTROL_PAYLOAD })
    );
    assert!(bytes_needed(&[0x10, 0xff, 0xff, 0xff, 0xff]).is_err());
    assert_eq!(bytes_needed(&[0x11, 0, 0, 0, 8]), Ok(13));
    assert_eq!(bytes_needed(&[0x11]), Ok(5));
}

#[test]
fn rejects_trailing_bytes() {
    assert_eq!(
        decode_all(&[0x11, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 1, 0xee]),
        Err(DecodeError::TrailingBytes { frame: "Ack", extra: 1 })
    );
}

#[test]
fn rejects_truncated_payload() {
    assert_eq!(decode_all(&[0x11, 0, 0, 0, 4, 0, 0, 0, 1]), Err(DecodeError::Truncated { frame: "Ack" }));
    assert_eq!(decode_all(&[0x10, 0, 0, 0, 3, 1, 2, 3]), Err(DecodeError::Truncated { frame: "Chunk" }));
}

#[test]
fn rejects_hostile_names() {
    // Hello with agent "../x".
    let mut payload = vec![4];
    payload.extend_from_slice(b"../x");
    payload.extend_from_slice(&[1, b'm', 1, b'b', 0, 0, 0, 1, 0, 0, 0, 1]);
    let mut frame = vec![0x01];
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(&payload);
    assert_eq!(
        decode_all(&frame),
        Err(DecodeError::BadName { frame: "Hello", field: "agent", error: NameError::BadStart })
    );
}

#[test]
fn rejects_unknown_compression_and_conn_kind() {
    let mut bytes = Frame::Welcome(Welcome {
        session: SessionId([0; 16]),
        compression: Compression::Gzip,
        level: 1,
        max_streams: 1,
    })
    .to_bytes()
    .expect("encodes");
    bytes[5 + 16] = 9;
    assert_eq!(decode_all(&bytes), Err(DecodeError::UnknownValue { field: "compression", value: 9 }));
    assert_eq!(Preamble::decode(b"HTTP/1.1 \r"), Err(DecodeError::UnknownConnKind(*b"HTTP")));
}

#[test]
fn keeps_unknown_reasons_from_newer_peers() {
    let bytes = [0x03, 0, 0, 0, 4, 0xbe, 0xef, 0, 0];
    assert_eq!(
        decode_all(&bytes),
        Ok(Some(Frame::Refused(Refusal { reason: Reason::Other(0xbeef), message: String::new() })))
    );
    assert_eq!(Reason::Other(0xbeef).to_string(), "reason 0xbeef");
}

#[test]
fn refusal_text_is_capped_on_a_char_boundary() {
    let r = Refusal::new(Reason::Internal, "é".repeat(MAX_TEXT_LEN));
    assert!(r.message.len() <= MAX_TEXT_LEN);
    assert!(decode_all(&Frame::Refused(r.clone()).to_bytes().expect("encodes")).is_ok());
}

#[test]
fn reason_codes_round_trip() {
    for code in 0..0x20u16 {
        assert_eq!(Reason::from_code(code).code(), code);
    }
}

fn arb_name() -> impl Strategy<Value = Name> {
    "[a-z0-9][a-z0-9_@+-]{0,40}".prop_map(|s| Name::new(s).expect("regex yields valid names"))
}

fn arb_reason() -> impl Strategy<Value = Reason> {
    any::<u16>().prop_map(Reason::from_code)
}

fn arb_compression() -> impl Strategy<Value = Compression> {
    prop_oneof![Just(Compression::Gzip), Just(Compression::Zstd)]
}

fn arb_frame() -> impl Strategy<Value = Frame> {
    prop_oneof![
        (arb_name(), arb_name(), arb_name(), ".{0,20}", any::<u32>(), any::<u16>()).prop_map(
            |(agent, storage, backup, agent_version, chunk_size, streams)| Frame::Hello(Hello {
                agent,
                storage,
                backup,
                agent_version,
                chunk_size,
                streams
            })
        ),
        (any::<[u8; 16]>(), arb_compression(), any::<i32>(), any::<u16>()).prop_map(|(s, c, l, m)| {
            Frame::Welcome(Welcome { session: SessionId(s), compression: c, level: l, max_streams: m })
        }),
        (arb_reason(), ".{0,50}").prop_map(|(r, m)| Frame::Refused(Refusal::new(r, m))),
        (arb_reason(), ".{0,50}").prop_map(|(r, m)| Frame::Abort(Refusal::new(r, m))),
        (any::<[u8; 16]>(), any::<u16>(), any::<u32>()).prop_map(|(s, stream, generation)| Frame::Join(Join {
            session: SessionId(s),
            stream,
            generation
        })),
        (any::<u16>(), any::<u64>()).prop_map(|(stream, contiguous)| Frame::Joined(Joined { stream, contiguous })),
        any::<[u8; 16]>().prop_map(|s| Frame::Status(Status { session: SessionId(s) })),
        prop_oneof![
            Just(SessionState::Unknown),
            any::<u64>().prop_map(|contiguous| SessionState::Open { contiguous }),
            (".{0,40}", any::<u64>(), any::<[u8; 32]>())
                .prop_map(|(archive, size, sha256)| SessionState::Committed(Committed { archive, size, sha256 })),
            (arb_reason(), ".{0,40}").prop_map(|(r, m)| SessionState::Failed(Refusal::new(r, m))),
        ]
        .prop_map(Frame::SessionState),
        any::<u64>().prop_map(|nonce| Frame::CtlPing(CtlPing { nonce })),
        (any::<u64>(), any::<u32>(), any::<u64>())
            .prop_map(|(nonce, load_milli, free_bytes)| Frame::CtlPong(CtlPong { nonce, load_milli, free_bytes })),
        (any::<u64>(), ".{0,200}").prop_map(|(id, json)| Frame::CtlReport(CtlMessage { id, json })),
        (any::<u64>(), ".{0,200}").prop_map(|(id, json)| Frame::CtlCommand(CtlMessage { id, json })),
        (any::<u64>(), any::<bool>(), ".{0,40}").prop_map(|(id, ok, message)| Frame::CtlResult(CtlResult {
            id,
            ok,
            message
        })),
        (any::<u64>(), any::<u64>(), proptest::collection::vec(any::<u8>(), 0..2048))
            .prop_map(|(seq, off, data)| Frame::Chunk(Chunk::new(seq, off, Bytes::from(data)))),
        any::<u64>().prop_map(|seq| Frame::Ack(Ack { seq })),
        Just(Frame::Keepalive),
        (any::<u64>(), any::<u64>())
            .prop_map(|(verified, total)| Frame::Committing(CommitProgress { verified, total })),
        (any::<u64>(), any::<u64>(), any::<[u8; 32]>(), any::<[u64; 3]>(), any::<Option<(u64, [u8; 32])>>()).prop_map(
            |(t, c, h, s, cat)| {
                Frame::Commit(Commit {
                    total_len: t,
                    chunks: c,
                    sha256: h,
                    stats: SourceStats { entries: s[0], bytes_read: s[1], skipped: s[2] },
                    catalog: cat.map(|(len, sha256)| CatalogDigest { len, sha256 }),
                })
            }
        ),
        (any::<u64>(), proptest::collection::vec(any::<u8>(), 0..512))
            .prop_map(|(offset, data)| Frame::CatalogPart(CatalogPart { offset, data: Bytes::from(data) })),
        ".{0,200}".prop_map(Frame::RestoreRequest),
        ".{0,200}".prop_map(Frame::RestoreReply),
        ".{0,200}".prop_map(Frame::EnrollRequest),
        ".{0,200}".prop_map(Frame::EnrollReply),
        (".{0,60}", any::<u64>(), any::<[u8; 32]>()).prop_map(|(archive, size, sha256)| Frame::Committed(Committed {
            archive,
            size,
            sha256
        })),
        (
            ".{0,20}",
            any::<u64>(),
            any::<bool>(),
            any::<u32>(),
            proptest::collection::vec((arb_name(), arb_compression(), any::<u64>(), any::<u64>()), 0..8)
        )
            .prop_map(|(v, up, dr, act, st)| Frame::Health(Health {
                server_version: v,
                uptime_secs: up,
                draining: dr,
                active_sessions: act,
                storages: st
                    .into_iter()
                    .map(|(name, compression, free_bytes, total_bytes)| StorageHealth {
                        name,
                        compression,
                        free_bytes,
                        total_bytes
                    })
                    .collect(),
            })),
    ]
}

proptest! {
    #[test]
    fn decode_inverts_encode(frame in arb_frame()) {
        prop_assert_eq!(decode_all(&frame.to_bytes().expect("encodes")), Ok(Some(frame)));
    }

    #[test]
    fn decoder_never_panics_on_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut buf = BytesMut::from(&bytes[..]);
        // Drain as many frames as the garbage happens to contain; any outcome but a
        // panic is acceptable.
        while let Ok(Some(_)) = decode_frame(&mut buf) {}
    }

    #[test]
    fn decoder_never_panics_on_mutated_frames(frame in arb_frame(), idx in any::<usize>(), byte in any::<u8>()) {
        let mut bytes = frame.to_bytes().expect("encodes");
        let i = idx % bytes.len();
        bytes[i] = byte;
        let _ = decode_frame(&mut bytes);
    }
}

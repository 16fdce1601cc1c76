//! Wycheproof AES-GCM vectors (C2SP/wycheproof `aes_gcm_test.json`, Apache-2.0, copied in
//! `../shared/data/vectors/wycheproof/`) through the SDK's AEAD code path: every 256-bit key,
//! 96-bit IV, 128-bit tag case, valid ones must match exactly and invalid ones must be refused.

use serde::Deserialize;

#[derive(Deserialize)]
struct File {
    #[serde(rename = "testGroups")]
    groups: Vec<Group>,
}

#[derive(Deserialize)]
struct Group {
    #[serde(rename = "keySize")]
    key_size: u32,
    #[serde(rename = "ivSize")]
    iv_size: u32,
    #[serde(rename = "tagSize")]
    tag_size: u32,
    tests: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    #[serde(rename = "tcId")]
    id: u32,
    key: String,
    iv: String,
    aad: String,
    msg: String,
    ct: String,
    tag: String,
    result: String,
}

#[test]
fn wycheproof_aes_256_gcm_through_the_sdk_aead() {
    let text = std::fs::read_to_string("../../shared/data/vectors/wycheproof/aes_gcm_test.json")
        .or_else(|_| std::fs::read_to_string("../shared/data/vectors/wycheproof/aes_gcm_test.json"))
        .expect("vector file");
    let file: File = serde_json::from_str(&text).expect("json");
    let (mut valid, mut invalid) = (0, 0);
    for group in file
        .groups
        .iter()
        .filter(|g| g.key_size == 256 && g.iv_size == 96 && g.tag_size == 128)
    {
        for case in &group.tests {
            let key: [u8; 32] = hex::decode(&case.key)
                .expect("hex")
                .try_into()
                .expect("32 bytes");
            let iv: [u8; 12] = hex::decode(&case.iv)
                .expect("hex")
                .try_into()
                .expect("12 bytes");
            let aad = hex::decode(&case.aad).expect("hex");
            let msg = hex::decode(&case.msg).expect("hex");
            let sealed = [
                hex::decode(&case.ct).expect("hex"),
                hex::decode(&case.tag).expect("hex"),
            ]
            .concat();
            let opened = sdk::envelope::aead::open(&key, &iv, &aad, &sealed);
            match case.result.as_str() {
                "valid" => {
                    assert_eq!(
                        sdk::envelope::aead::seal(&key, &iv, &aad, &msg).expect("seal"),
                        sealed,
                        "tcId {}",
                        case.id
                    );
                    assert_eq!(
                        opened.expect("open").as_slice(),
                        msg.as_slice(),
                        "tcId {}",
                        case.id
                    );
                    valid += 1;
                }
                "invalid" => {
                    assert!(
                        matches!(opened, Err(sdk::Error::InvalidCiphertext)),
                        "tcId {} accepted",
                        case.id
                    );
                    invalid += 1;
                }
                other => panic!("tcId {}: unexpected result {other}", case.id),
            }
        }
    }
    assert!(
        valid >= 20 && invalid >= 10,
        "too few vectors exercised: {valid} valid, {invalid} invalid"
    );
}

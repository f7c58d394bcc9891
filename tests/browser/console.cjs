// Drives Debian's headless Chromium through the operator console as an operator would: logs in
// through the form, opens the overview, the dead letters and the first dead letter's page, and
// saves for each a screenshot (PNG) and the DOM after load (HTML) into OUT_DIR.
// Run by tests/integration/browser.rs with:
//   PLAYWRIGHT_CORE  path of the playwright-core package (installed by scripts/test.sh)
//   CONSOLE_URL      e.g. http://127.0.0.1:41234
//   CONSOLE_TOKEN    the console's token
//   OUT_DIR          where the files go (target/console-browser)
//   CHROMIUM         the browser (default /usr/bin/chromium)
//   DETAIL_ASSET     the asset whose dead letter to open (default: the first row's)
// Prints one JSON line per page: {"page", "url", "status", "title"}.
const { chromium } = require(process.env.PLAYWRIGHT_CORE);
const fs = require('fs');
const path = require('path');

(async () => {
  const out = process.env.OUT_DIR;
  fs.mkdirSync(out, { recursive: true });
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 1280, height: 800 } });
    const base = process.env.CONSOLE_URL;
    const save = async (name) => {
      fs.writeFileSync(path.join(out, `${name}.html`), await page.content());
      await page.screenshot({ path: path.join(out, `${name}.png`), fullPage: true });
    };
    const report = (name, response) =>
      console.log(JSON.stringify({ page: name, url: page.url(), status: response && response.status(), title: await_title }));
    let await_title = '';

    let response = await page.goto(`${base}/`);
    await_title = await page.title();
    report('before-login', response);
    await save('login');

    await page.fill('input[name=token]', process.env.CONSOLE_TOKEN);
    await page.fill('input[name=operator]', 'browser-test');
    [response] = await Promise.all([page.waitForNavigation(), page.click('button[type=submit]')]);
    await_title = await page.title();
    report('overview', response);
    await save('overview');

    response = await page.goto(`${base}/dead-letters`);
    await_title = await page.title();
    report('dead-letters', response);
    await save('dead-letters');

    const wanted = process.env.DETAIL_ASSET;
    const first = wanted
      ? await page.$(`#dead-letters tbody tr td a:has-text("${wanted}")`)
      : await page.$('#dead-letters tbody tr td a');
    if (first) {
      [response] = await Promise.all([page.waitForNavigation(), first.click()]);
      await_title = await page.title();
      report('dead-letter', response);
      await save('dead-letter');
    }
  } finally {
    await browser.close();
  }
})().catch((e) => { console.error(e); process.exit(1); });

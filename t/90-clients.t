#!/usr/bin/perl

# The clients teams run, unmodified, through a pool whose requests go to
# Amazon Bedrock's InvokeModel: Anthropic's TypeScript SDK (a message and
# a stream) and Claude Code (`claude -p`), pointed at the gateway with
# ANTHROPIC_BASE_URL and a gateway token.  What they get was translated
# both ways: the body and path for InvokeModel, and its binary event
# stream back into the SSE they parse.  Needs the npm packages that
# `make deps` installs (build/npm); skipped without them.

use strict;
use warnings;

use lib 't/lib';

use FindBin;
use Test::More;

use Ratepool::Test;

my $npm = $ENV{RATEPOOL_NPM} || "$FindBin::Bin/../build/npm";
my $sdk = "$npm/node_modules/\@anthropic-ai/sdk";
my $claude = "$npm/node_modules/.bin/claude";

plan skip_all => "the npm clients are not installed in $npm (make deps)"
    unless -d $sdk && -x $claude && `node --version 2>/dev/null` =~ /^v\d/;

my $t = Ratepool::Test->new;

my $rand = \&Ratepool::Test::random_hex;
my $ANTHROPIC = 'sk-ant-mock-a1-' . $rand->(8);
my $BEDROCK_KEY = 'ABSK' . $rand->(24);
my $CLIENT = 'gw-clients-' . $rand->(8);

my $mock = $t->start_mock(port => 1, log => 1, config => {
    keys => {
        $ANTHROPIC   => { org => 'anthropic-1', name => 'a1' },
        $BEDROCK_KEY => { org => 'aws-east', name => 'east' },
    },
});

$t->write_config(<<"EOF");
%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    ratepool_zone llm:1m;

    ratepool_model claude-sonnet-4-6
                   bedrock=us.anthropic.claude-sonnet-4-6-v1:0;

    # messages go to Bedrock's InvokeModel; what only Anthropic serves
    # (counting tokens) to the Anthropic key
    upstream clouds {
        ratepool zone=llm;
        ratepool_key east provider=bedrock-invoke region=us-east-1
                     org=aws-east server=127.0.0.1:%%PORT_1%%
                     key=$BEDROCK_KEY;
        ratepool_key a1 org=anthropic-1 server=127.0.0.1:%%PORT_1%%
                     key=$ANTHROPIC fallback=1;
    }

    ratepool_workspace team;
    ratepool_client team ${\ $t->token_hash($CLIENT)};

    server {
        listen 127.0.0.1:%%PORT_0%%;

        location / {
            ratepool_pass http://clouds;
        }
    }
}
EOF

$t->run;

my $dir = $t->testdir;
my $base = 'http://127.0.0.1:' . $t->port(0);

sub bedrock_calls {
    return grep { ($_->{key_name} // '') eq 'east'
                  && $_->{path} =~ m{^/model/} } @{ $mock->log };
}

# --- the SDK ----------------------------------------------------------------

$t->write_file('sdk.mjs', <<'EOF');
import Anthropic from '@anthropic-ai/sdk';

const client = new Anthropic({ baseURL: process.env.BASE,
                               apiKey: process.env.TOKEN, maxRetries: 0 });
const params = { model: 'claude-sonnet-4-6', max_tokens: 100,
                 messages: [{ role: 'user', content: 'Say hello' }] };

const message = await client.messages.create(params);
console.log('create:', message.content[0].text, message.usage.output_tokens);

const stream = client.messages.stream(params);
let text = '';
stream.on('text', (t) => { text += t; });
const final = await stream.finalMessage();
console.log('stream:', text, final.stop_reason, final.usage.output_tokens);
EOF

# the script finds the packages where node looks: beside it
symlink "$npm/node_modules", "$dir/node_modules" or die "symlink: $!\n";

my $out = `cd $dir && BASE=$base TOKEN=$CLIENT node sdk.mjs 2>&1`;
is($?, 0, 'Anthropic\'s TypeScript SDK runs unmodified against the gateway')
    or diag $out;
like($out, qr/^create: Hello from east \d+$/m,
     'messages.create gets Bedrock\'s answer');
like($out, qr/^stream: Hello from east end_turn \d+$/m,
     'messages.stream gets it too, event by event, from InvokeModel\'s '
     . 'event stream');
is(scalar(bedrock_calls()), 2, 'both went to InvokeModel');

# --- Claude Code ------------------------------------------------------------

my $home = "$dir/home";
mkdir $home;
my $before = bedrock_calls();

$out = `cd $dir && HOME=$home ANTHROPIC_BASE_URL=$base ANTHROPIC_API_KEY=$CLIENT ANTHROPIC_MODEL=claude-sonnet-4-6 ANTHROPIC_SMALL_FAST_MODEL=claude-sonnet-4-6 CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC=1 DISABLE_AUTOUPDATER=1 timeout 120 $claude -p 'Say hello' --output-format text < /dev/null 2>&1`;
is($?, 0, 'Claude Code (claude -p) runs unmodified against the gateway')
    or diag $out;
like($out, qr/Hello from east/, 'and prints Bedrock\'s answer');
cmp_ok(scalar(bedrock_calls()), '>', $before,
       'its messages went to InvokeModel');
ok(!grep({ $_->{status} >= 400 } bedrock_calls()),
   'and none was refused there (its beta flags left out)');

$t->stop;
$t->check_log;

done_testing;

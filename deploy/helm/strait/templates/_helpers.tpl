{{- define "strait.labels" -}}
app.kubernetes.io/name: strait-controller
app.kubernetes.io/part-of: strait
{{- end }}

{{/*
The identity: given in values, else kept from a previous install, else generated
(one self-signed issuer that is also the trust anchor).
*/}}
{{- define "strait.identity" -}}
{{- /* Made once per render and kept: every template that includes it (the
identity objects, the controller's checksum of them) must see the same one. */ -}}
{{- if not .Values._identity -}}
{{- $_ := set .Values "_identity" (include "strait.identity.make" .) -}}
{{- end -}}
{{- .Values._identity -}}
{{- end }}

{{/*
A hash of the public identity (trust anchors and issuer certificate): on the
controller's pod template, so that changing the identity restarts the
controllers, which read it only at start.
*/}}
{{- define "strait.identityChecksum" -}}
{{- $id := include "strait.identity" . | fromJson -}}
{{- printf "%s%s" $id.anchors $id.crt | sha256sum -}}
{{- end }}

{{- define "strait.identity.make" -}}
{{- $i := .Values.identity -}}
{{- $given := list $i.trustAnchorsPEM $i.issuer.crtPEM $i.issuer.keyPEM | compact | len -}}
{{- if and (gt $given 0) (lt $given 3) -}}
{{- fail "identity: give trustAnchorsPEM, issuer.crtPEM and issuer.keyPEM together, or none of them" -}}
{{- end -}}
{{- if eq $given 3 -}}
{{- if not (contains "-----BEGIN CERTIFICATE-----" $i.trustAnchorsPEM) -}}
{{- fail "identity.trustAnchorsPEM holds no PEM certificate" -}}
{{- end -}}
{{- if not (contains "-----BEGIN CERTIFICATE-----" $i.issuer.crtPEM) -}}
{{- fail "identity.issuer.crtPEM holds no PEM certificate" -}}
{{- end -}}
{{- if not (contains "PRIVATE KEY-----" $i.issuer.keyPEM) -}}
{{- fail "identity.issuer.keyPEM holds no PEM private key" -}}
{{- end -}}
{{- end -}}
{{- if eq $given 3 -}}
{{- dict "anchors" .Values.identity.trustAnchorsPEM "crt" .Values.identity.issuer.crtPEM "key" .Values.identity.issuer.keyPEM | toJson -}}
{{- else -}}
{{- $secret := lookup "v1" "Secret" .Values.namespace "strait-identity-issuer" -}}
{{- $anchors := lookup "v1" "ConfigMap" .Values.namespace "strait-trust-anchors" -}}
{{- if and $secret $anchors -}}
{{- dict "anchors" (index $anchors.data "ca.crt") "crt" (index $secret.data "tls.crt" | b64dec) "key" (index $secret.data "tls.key" | b64dec) | toJson -}}
{{- else if or $secret $anchors -}}
{{- fail (printf "%s has only one of Secret strait-identity-issuer and ConfigMap strait-trust-anchors: give the identity values (a new identity would replace the one running proxies trust)" .Values.namespace) -}}
{{- else if and (lookup "admissionregistration.k8s.io/v1" "MutatingWebhookConfiguration" "" "strait-proxy-injector") (not (lookup "apps/v1" "Deployment" .Values.namespace "strait-controller")) -}}
{{- fail (printf "%s holds no install, but MutatingWebhookConfiguration strait-proxy-injector remains: the install's trust anchors and issuer were lost (the namespace deleted?), and meshed pods may still trust them. Give the old identity values; or, once no meshed pod runs (or to restart them all after), delete that configuration to generate a new identity (docs/kubernetes.md, \"The identity lost\")" .Values.namespace) -}}
{{- else if not (or (lookup "v1" "Namespace" "" "kube-system") .Values.identity.generateWithoutCluster) -}}
{{- /* Rendered with no cluster to read back from (helm template, Argo CD): an
identity generated here would be another at every render, and applied, would
replace the anchors under running proxies. */ -}}
{{- fail "rendered without a cluster (helm template, Argo CD, --dry-run), where an installed identity cannot be read back: a generated one would differ at each render and, applied, cut running proxies off. Give identity.trustAnchorsPEM, identity.issuer.crtPEM and identity.issuer.keyPEM (docs/kubernetes.md, \"Installing\"), or set identity.generateWithoutCluster=true where this render is only looked at and the real install or upgrade reads the cluster (helm diff, helmfile's diff), never where it is applied (Argo CD, helm template | kubectl apply)" -}}
{{- else -}}
{{- $ca := genCAWithKey (printf "root.%s" .Values.trustDomain) 365 (genPrivateKey "ecdsa") -}}
{{- dict "anchors" $ca.Cert "crt" $ca.Cert "key" $ca.Key | toJson -}}
{{- end -}}
{{- end -}}
{{- end }}
